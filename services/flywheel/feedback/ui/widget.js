// Flywheel's feedback widget (docs/PAGE.md): one script an application adds to its own page to show
// thumbs and a rating under an answer it got from Flywheel.
//
//   <script src="https://feedback.example.com/ui/widget.js"></script>
//   Flywheel.feedback(element, {interaction_id, feedback_token, user_id});   // or {..., session: "fws1..."}
//
// It posts to the feedback service it was loaded from (cross-origin: that service's
// server.cors_origins must list the application's origin). No inline style or markup strings:
// it works under the application's own strict CSP.
"use strict";

(() => {
  const script = document.currentScript;
  const ORIGIN = script && script.src ? new URL(script.src).origin : location.origin;

  const OUTCOMES = {
    accepted: "Thanks, recorded.",
    spooled: "Thanks, saved; it will be delivered shortly.",
    duplicate: "Already received.",
    already_voted: "You already rated this answer; your first rating counts.",
  };

  function randomId() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "fb-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function style(el, props) {
    Object.assign(el.style, props);
    return el;
  }

  function button(label, text) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.setAttribute("aria-pressed", "false");
    style(b, { font: "inherit", minHeight: "2rem", padding: "0.1rem 0.55rem", cursor: "pointer" });
    return b;
  }

  async function refusal(resp) {
    let text = `HTTP ${resp.status}`;
    try {
      text = (await resp.json()).error || text;
    } catch (e) {
      /* not JSON */
    }
    if (resp.status === 429) {
      const s = parseInt(resp.headers.get("retry-after") || "", 10);
      return ["rate_limited", `Too many ratings: wait ${Number.isFinite(s) ? s + " s" : "a moment"} and try again.`];
    }
    if (/expired/i.test(text)) return ["expired", "This answer is too old to rate now."];
    return ["refused", `Not accepted: ${text}`];
  }

  /**
   * Render thumbs up/down and a 1..rating_scale rating under `element` (appended to it).
   * options: interaction_id, feedback_token (from the policy's answer), user_id (the end user the
   * answer was served to) or session (a fws1 session your server minted), and optionally
   * rating_scale (default 3) and endpoint (default: the feedback service this script came from).
   * Returns the widget's root element; its data-outcome attribute holds the last outcome.
   */
  function feedback(element, options) {
    const opts = Object.assign({ rating_scale: 3, endpoint: ORIGIN }, options || {});
    if (!opts.interaction_id || !opts.feedback_token) {
      throw new Error("Flywheel.feedback: pass interaction_id and feedback_token from the answer");
    }
    if (!opts.user_id && !opts.session) {
      throw new Error("Flywheel.feedback: pass user_id (the answer's user) or session");
    }
    const root = style(document.createElement("div"), {
      display: "flex", flexWrap: "wrap", gap: "0.35rem", alignItems: "center", marginTop: "0.4rem",
    });
    root.className = "flywheel-feedback";
    root.setAttribute("role", "group");
    root.setAttribute("aria-label", "Rate this answer");
    const status = style(document.createElement("span"), { fontSize: "0.85em", marginLeft: "0.3rem" });
    status.setAttribute("role", "status");
    status.setAttribute("aria-live", "polite");

    async function send(value, pressed) {
      const body = Object.assign(
        { feedback_id: randomId(), interaction_id: opts.interaction_id, feedback_token: opts.feedback_token },
        value,
      );
      const headers = { "content-type": "application/json" };
      if (opts.session) headers.authorization = "Bearer " + opts.session;
      if (opts.user_id) body.user_id = opts.user_id;
      let outcome, text;
      try {
        const resp = await fetch(opts.endpoint.replace(/\/$/, "") + "/feedback", {
          method: "POST", headers, body: JSON.stringify(body), credentials: "omit",
        });
        if (resp.ok) {
          outcome = (await resp.json()).status;
          text = OUTCOMES[outcome] || outcome;
          if (outcome !== "already_voted") pressed.setAttribute("aria-pressed", "true");
        } else {
          [outcome, text] = await refusal(resp);
        }
      } catch (e) {
        [outcome, text] = ["network", "Could not reach the feedback service."];
      }
      root.dataset.outcome = outcome;
      status.textContent = text;
    }

    const up = button("Good answer", "\u2713 Good");
    const down = button("Bad answer", "\u2717 Bad");
    up.addEventListener("click", () => send({ thumbs: 1 }, up));
    down.addEventListener("click", () => send({ thumbs: -1 }, down));
    root.append(up, down);
    for (let r = 1; r <= opts.rating_scale; r++) {
      const b = button(`Rate ${r} of ${opts.rating_scale}`, String(r));
      b.addEventListener("click", () => send({ rating: r }, b));
      root.append(b);
    }
    root.append(status);
    element.appendChild(root);
    return root;
  }

  window.Flywheel = Object.assign(window.Flywheel || {}, { feedback });
})();
