{{/* Names and labels shared by every template. */}}

{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "flywheel.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "flywheel.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flywheel.labels" -}}
helm.sh/chart: {{ include "flywheel.chart" . }}
{{ include "flywheel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- end }}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one service's objects; call with (dict "root" $ "svc" "policy"). */}}
{{- define "flywheel.svcLabels" -}}
{{ include "flywheel.labels" .root }}
app.kubernetes.io/component: {{ .svc }}
{{- end }}

{{- define "flywheel.svcSelector" -}}
{{ include "flywheel.selectorLabels" .root }}
app.kubernetes.io/component: {{ .svc }}
{{- end }}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret one service reads: its own (<fullname>-<svc>-secrets), or secret.existingSecret, from
     which each pod still takes only its keys. Call with (dict "root" $ "svc" "policy"). */}}
{{- define "flywheel.secretName" -}}
{{- default (printf "%s-%s-secrets" (include "flywheel.fullname" .root) .svc) .root.Values.secret.existingSecret }}
{{- end }}

{{/* The secret keys one service gets, space-separated (docs/SECURITY.md, "Who can reach what"): the
     policy recognises the admin by the token's hash and holds no signing key; feedback holds neither
     admin nor service token; only the publishers (the trainer, a reward that trains) the signing key. */}}
{{- define "flywheel.secretKeys" -}}
{{- $v := .root.Values }}
{{- $keys := get (dict
    "policy" (list "hmac-key" "api-keys" "admin-token-sha256" "model-trusted-keys")
    "feedback" (list "hmac-key" "api-keys")
    "reward" (list "api-keys" "service-token" "model-trusted-keys")
    "trainer" (list "admin-token" "service-token" "model-signing-key" "model-trusted-keys")) .svc }}
{{- if and (eq .svc "reward") $v.reward.train }}
{{- $keys = append $keys "model-signing-key" }}
{{- end }}
{{- if hasPrefix "SASL_" $v.kafka.securityProtocol }}
{{- $keys = append $keys "kafka-sasl-password" }}
{{- end }}
{{- join " " $keys }}
{{- end }}

{{/* The variable each secret key sets (model-signing-key is a file: FLYWHEEL_MODEL_STORE_SIGNING_KEY). */}}
{{- define "flywheel.secretEnv" -}}
{{- get (dict
    "hmac-key" "FLYWHEEL_AUTH_HMAC_KEY"
    "api-keys" "FLYWHEEL_AUTH_API_KEYS"
    "admin-token" "FLYWHEEL_AUTH_ADMIN_TOKEN"
    "admin-token-sha256" "FLYWHEEL_AUTH_ADMIN_TOKEN_SHA256"
    "service-token" "FLYWHEEL_AUTH_SERVICE_TOKEN"
    "model-trusted-keys" "FLYWHEEL_MODEL_STORE_TRUSTED_KEYS"
    "kafka-sasl-password" "FLYWHEEL_KAFKA_SASL_PASSWORD") . }}
{{- end }}

{{/* Whether a service writes the model store: the trainer and a reward that trains. The others mount
     it read-only (a compromised pod cannot overwrite weights; signatures catch the rest). */}}
{{- define "flywheel.writesModels" -}}
{{- or (eq .svc "trainer") (and (eq .svc "reward") .root.Values.reward.train) }}
{{- end }}

{{/* The raw Ed25519 public key, in base64 (what model_store.trusted_keys takes), of a PKCS#8 PEM
     private key. Helm has no function for it, so it is read from the SubjectPublicKeyInfo (a fixed
     12-byte prefix, then the 32 key bytes) of a throwaway certificate signed with that key. */}}
{{- define "flywheel.ed25519Public" -}}
{{- $cert := genSelfSignedCertWithKey "flywheel-model-signing" nil nil 1 . }}
{{- $der := regexReplaceAll "-----[A-Z ]+-----|\\s" $cert.Cert "" | b64dec }}
{{- $parts := splitList "\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00" $der }}
{{- if ne (len $parts) 2 }}
{{- fail "secret.signingKey is not an Ed25519 private key: give the PEM that `python -m flywheel.core.signing keygen DIR` writes" }}
{{- end }}
{{- index $parts 1 | trunc 32 | b64enc }}
{{- end }}

{{/* Values that cannot be checked by the schema alone; included by deployments.yaml. */}}
{{- define "flywheel.checks" -}}
{{- $tls := .Values.tls }}
{{- if and $tls.enabled (not $tls.secret) }}
{{- fail "tls.enabled needs tls.secret: a Secret with tls.crt, tls.key and ca.crt (e.g. cert-manager's)" }}
{{- end }}
{{- if and $tls.mutual (not $tls.enabled) }}
{{- fail "tls.mutual needs tls.enabled (and tls.secret): mutual TLS is TLS that also asks clients for a certificate" }}
{{- end }}
{{- range $svc := splitList " " (include "flywheel.services" .) }}
{{- $v := index $.Values $svc }}
{{- if has (int $v.metricsPort) (list (int $v.grpcPort) (int $v.httpPort)) }}
{{- fail (printf "%s.metricsPort %v is also its gRPC or HTTP port: give /metrics a port of its own" $svc $v.metricsPort) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.modelStoreClaim" -}}
{{- default (printf "%s-models" (include "flywheel.fullname" .)) .Values.modelStore.existingClaim }}
{{- end }}

{{/* Image of one service: repository:tag-variant (cuda or cpu). */}}
{{- define "flywheel.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- printf "%s:%s-%s" $img.repository $tag .variant }}
{{- end }}

{{/* Kafka bootstrap: the configured servers, or the Strimzi cluster's bootstrap service. */}}
{{- define "flywheel.kafkaBootstrap" -}}
{{- if .Values.kafka.bootstrap }}
{{- .Values.kafka.bootstrap }}
{{- else if .Values.kafka.strimzi.enabled }}
{{- printf "%s-kafka-bootstrap.%s.svc:9092" .Values.kafka.strimzi.cluster (default .Release.Namespace .Values.kafka.strimzi.namespace) }}
{{- else }}
{{- fail "kafka.bootstrap is empty: set it to your Kafka's host:port, or enable kafka.strimzi" }}
{{- end }}
{{- end }}

{{/* Address of a peer service inside the cluster, e.g. flywheel-reward:50053. */}}
{{- define "flywheel.addr" -}}
{{- printf "%s-%s:%v" (include "flywheel.fullname" .root) .svc (index .root.Values .svc).grpcPort }}
{{- end }}

{{- define "flywheel.services" -}}
policy feedback reward trainer
{{- end }}

{{/* The feedback page's origin (where browsers load it) and the policy URL it calls ("" = the
same origin, through the Ingress), as YAML: page.policyUrl, else the Ingress host, else
localhost ports for `kubectl port-forward`. */}}
{{- define "flywheel.page" -}}
{{- $ing := .Values.ingress }}
{{- $origin := printf "http://localhost:%v" .Values.feedback.httpPort }}
{{- $url := printf "http://localhost:%v" .Values.policy.httpPort }}
{{- if $ing.enabled }}
{{- $origin = printf "%s://%s" ($ing.tls.enabled | ternary "https" "http") $ing.host }}
{{- $url = "" }}
{{- end }}
{{- with .Values.page.policyUrl }}{{ $url = trimSuffix "/" . }}{{ end }}
origin: {{ $origin | quote }}
policyUrl: {{ $url | quote }}
{{- end }}
