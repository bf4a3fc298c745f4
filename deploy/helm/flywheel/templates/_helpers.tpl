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

{{- define "flywheel.secretName" -}}
{{- default (printf "%s-secrets" (include "flywheel.fullname" .)) .Values.secret.existingSecret }}
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
