// The feedback page (docs/PAGE.md): chat with the policy (streamed), thumbs / rating / edit /
// comment on every answer, and compare mode (two answers, pick with 1/2/3 or arrows + Enter).
// Hand-written, no framework and no inline code, so the page's CSP can forbid inline script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    config: { policy_url: "", rating_scale: 3, session_required: false, prompts: [] },
    session: null, // fws1... from ?session=, kept in sessionStorage (this tab only)
    user: null, // anonymous id per browser (localStorage), when there is no session
    answers: 0,
    promptIndex: 0,
    pair: null, // the /generate_pair answer being judged
    choice: null, // "A" | "B" | "TIE" chosen with the arrows, confirmed with Enter
    picking: false,
    compared: 0,
    recorded: null, // the last choice, said with the next pair
  };

  // ------------------------------------------------------------------ identity
  function randomId(prefix) {
    // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function stored(storage, key, make) {
    try {
      let value = storage.getItem(key);
      if (!value && make) {
        value = make();
        storage.setItem(key, value);
      }
      return value;
    } catch (e) {
      return make ? make() : null; // storage disabled: this page view only
    }
  }

  function sessionUser(token) {
    // The session's payload (fws1.<payload>.<mac>) names its user; only shown, never trusted here.
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const payload = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
      return payload.user_id || payload.user || payload.u || null;
    } catch (e) {
      return null;
    }
  }

  function identify() {
    const params = new URLSearchParams(location.search);
    const fromUrl = params.get("session");
    if (fromUrl) {
      try {
        sessionStorage.setItem("flywheel.session", fromUrl);
      } catch (e) {
        /* kept in memory below */
      }
      params.delete("session"); // out of the address bar, the history and any Referer
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    }
    state.session = fromUrl || stored(sessionStorage, "flywheel.session", null);
    const who = $("who");
    if (state.session) {
      const user = sessionUser(state.session);
      who.textContent = user ? `Signed in by your application as ${user}` : "Signed in by your application";
    } else {
      state.user = stored(localStorage, "flywheel.user", () => randomId("anon-"));
      who.textContent = `Anonymous (${state.user.slice(0, 13)}..., kept in this browser)`;
      who.title = state.user;
      who.dataset.user = state.user;
    }
  }

  function headers(forPolicy) {
    const h = { "content-type": "application/json" };
    if (state.session) h.authorization = "Bearer " + state.session;
    else if (forPolicy) h["x-flywheel-user-id"] = state.user;
    return h;
  }

  // ------------------------------------------------------------------ status line
  function say(text, kind, tone) {
    const el = $("status");
    el.textContent = text;
    el.dataset.kind = kind;
    el.className = "status " + (tone || "");
  }

  function waitText(resp) {
    const s = parseInt(resp.headers.get("retry-after") || "", 10);
    if (!Number.isFinite(s)) return "a moment";
    return s === 1 ? "1 second" : `${s} seconds`;
  }

  async function errorOf(resp) {
    try {
      const body = await resp.json();
      return { text: String(body.error || resp.statusText), type: String(body.error_type || "") };
    } catch (e) {
      return { text: `HTTP ${resp.status}`, type: "" };
    }
  }

  // What a refused feedback or question means to a person.
  async function explain(resp, what) {
    const err = await errorOf(resp);
    if (resp.status === 429) {
      return ["rate_limited", `Too many ${what} in a short time: please wait ${waitText(resp)} and try again.`];
    }
    if (/expired/i.test(err.text) && /session/i.test(err.text)) {
      return ["session_expired", "Your session has expired: open this page again from your application."];
    }
    if (/expired/i.test(err.text)) {
      return ["expired", "This answer is too old to rate now (its feedback link expired). Ask again for a fresh one."];
    }
    if (resp.status === 401) return ["unauthenticated", `You are not signed in for this: ${err.text}`];
    if (resp.status === 403) return ["refused", `This was refused: ${err.text}`];
    if (resp.status === 503) return ["unavailable", "The service is not available right now: try again shortly."];
    return ["refused", `Not accepted: ${err.text}`];
  }

  const OUTCOMES = {
    accepted: ["Thanks, your feedback was recorded.", "good"],
    spooled: ["Thanks, your feedback was saved and will be delivered shortly.", "good"],
    duplicate: ["We already had this feedback; nothing changed.", ""],
    already_voted: ["You already gave this kind of feedback on this answer; your first one counts.", ""],
  };

  // POST /feedback; the outcome name ("accepted", ... or a refusal's kind), after saying it.
  async function sendFeedback(body) {
    body.feedback_id = randomId("fb-");
    if (!state.session) body.user_id = state.user;
    let resp;
    try {
      resp = await fetch("/feedback", { method: "POST", headers: headers(false), body: JSON.stringify(body) });
    } catch (e) {
      say("Could not reach the feedback service: check your connection and try again.", "network", "bad");
      return "network";
    }
    if (!resp.ok) {
      const [kind, text] = await explain(resp, "ratings");
      say(text, kind, "bad");
      return kind;
    }
    const { status } = await resp.json();
    const [text, tone] = OUTCOMES[status] || [`Feedback ${status}.`, ""];
    say(text + (body.comment ? " Your comment came with it." : ""), status, tone);
    return status;
  }

  const counted = (outcome) => outcome === "accepted" || outcome === "spooled" || outcome === "duplicate";

  // ------------------------------------------------------------------ streamed answers (TGI SSE)
  async function* sseBatches(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const batch = [];
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5))
          .join("\n");
        if (data.trim()) batch.push(JSON.parse(data));
      }
      if (batch.length) yield batch;
    }
  }

  function policyUrl(path) {
    return state.config.policy_url + path;
  }

  function newAnswer(prompt) {
    const n = ++state.answers;
    const li = $("answer-template").content.firstElementChild.cloneNode(true);
    li.id = `answer-${n}`;
    li.dataset.state = "streaming";
    li.querySelector(".question").textContent = prompt;
    li.querySelector(".feedback").setAttribute("aria-label", `Feedback on answer ${n}`);
    const rating = li.querySelector(".rating");
    rating.setAttribute("aria-label", `Rate answer ${n} from 1 to ${state.config.rating_scale}`);
    for (let r = 1; r <= state.config.rating_scale; r++) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "rate";
      b.dataset.rating = String(r);
      b.textContent = String(r);
      b.setAttribute("aria-pressed", "false");
      b.setAttribute("aria-label", `Rate ${r} of ${state.config.rating_scale}`);
      rating.appendChild(b);
    }
    const ids = [
      [".comment-label", ".comment", `comment-${n}`],
      [".edit-label", ".edit-text", `edit-${n}`],
    ];
    for (const [label, field, id] of ids) {
      li.querySelector(field).id = id;
      li.querySelector(label).htmlFor = id;
    }
    setEnabled(li, false);
    $("answers").appendChild(li);
    return li;
  }

  function setEnabled(li, on) {
    li.querySelectorAll(".feedback button").forEach((b) => (b.disabled = !on));
  }

  async function ask(prompt) {
    const li = newAnswer(prompt);
    const text = li.querySelector(".text");
    const meta = li.querySelector(".meta");
    text.textContent = "";
    li.scrollIntoView({ block: "nearest" });
    say("Answering...", "answering", "");
    let resp;
    try {
      resp = await fetch(policyUrl("/generate_stream"), {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify({ inputs: prompt, parameters: { do_sample: true } }),
      });
    } catch (e) {
      li.dataset.state = "error";
      text.textContent = "(no answer)";
      say("Could not reach the model: check your connection, or ask the operator (policy URL).", "network", "bad");
      return;
    }
    if (!resp.ok) {
      li.dataset.state = "error";
      text.textContent = "(no answer)";
      const [kind, message] = await explain(resp, "questions");
      say(message, kind, "bad");
      return;
    }
    let last = null;
    try {
      for await (const batch of sseBatches(resp)) {
        for (const ev of batch) {
          if (ev.error) throw new Error(ev.error);
          if (ev.token && !ev.token.special) text.textContent += ev.token.text;
          if (ev.interaction_id) last = ev;
        }
      }
    } catch (e) {
      li.dataset.state = "error";
      say(`The answer stopped early: ${e.message}`, "stream_error", "bad");
      return;
    }
    if (!last) {
      li.dataset.state = "error";
      say("The answer ended without its id, so it cannot be rated.", "stream_error", "bad");
      return;
    }
    text.textContent = last.generated_text.trim();
    li.dataset.interactionId = last.interaction_id;
    li.dataset.version = String(last.policy_version);
    li.feedbackToken = last.feedback_token;
    meta.textContent = `policy version ${last.policy_version}`;
    li.dataset.state = "done";
    setEnabled(li, true);
    say("Answered. Rate it with the buttons under the answer.", "answered", "");
  }

  // One listener for every answer's controls.
  async function onAnswerClick(event) {
    const button = event.target.closest("button");
    const li = event.target.closest(".answer");
    if (!button || !li || li.dataset.state !== "done") return;
    const editor = li.querySelector(".editor");
    if (button.classList.contains("edit-open")) {
      const open = editor.hidden;
      editor.hidden = !open;
      button.setAttribute("aria-expanded", String(open));
      if (open) {
        const area = li.querySelector(".edit-text");
        area.value = li.querySelector(".text").textContent;
        area.focus();
      }
      return;
    }
    if (button.classList.contains("edit-cancel")) {
      editor.hidden = true;
      li.querySelector(".edit-open").setAttribute("aria-expanded", "false");
      li.querySelector(".edit-open").focus();
      return;
    }
    if (button.dataset.thumbs) {
      const up = button.dataset.thumbs === "1";
      const outcome = await rate(li, { thumbs: up ? 1 : -1 }, button);
      if (counted(outcome)) li.classList.add(up ? "voted-up" : "voted-down");
    } else if (button.dataset.rating) {
      await rate(li, { rating: Number(button.dataset.rating) }, button);
    }
  }

  async function rate(li, value, button) {
    const comment = li.querySelector(".comment");
    const body = { interaction_id: li.dataset.interactionId, feedback_token: li.feedbackToken, ...value };
    if (comment.value.trim()) body.comment = comment.value.trim();
    const outcome = await sendFeedback(body);
    if (counted(outcome)) {
      if (body.comment) comment.value = "";
      if (button) button.setAttribute("aria-pressed", "true");
    }
    return outcome;
  }

  async function onEditSubmit(event) {
    event.preventDefault();
    const li = event.target.closest(".answer");
    const text = li.querySelector(".edit-text").value.trim();
    if (!text) {
      say("Write the answer you wanted first.", "empty", "bad");
      return;
    }
    const outcome = await rate(li, { demonstration: text }, null);
    if (counted(outcome)) {
      event.target.hidden = true;
      const open = li.querySelector(".edit-open");
      open.setAttribute("aria-expanded", "false");
      open.setAttribute("aria-pressed", "true");
      open.focus();
    }
  }

  // ------------------------------------------------------------------ compare mode
  function nextPrompt() {
    const list = state.config.prompts;
    if (!list.length) return "";
    const p = list[state.promptIndex % list.length];
    state.promptIndex++;
    return p;
  }

  function choose(which) {
    state.choice = which;
    $("side-a").classList.toggle("chosen", which === "A");
    $("side-b").classList.toggle("chosen", which === "B");
    for (const b of document.querySelectorAll(".choices button")) {
      b.classList.toggle("selected", b.dataset.pick === which);
    }
    const button = document.querySelector(`.choices button[data-pick="${which}"]`);
    if (button) button.focus();
  }

  function showPair(pair) {
    for (const side of ["a", "b"]) {
      $(`text-${side}`).textContent = pair ? pair[side].generated_text.trim() : "";
      $(`meta-${side}`).textContent = pair ? `policy version ${pair[side].policy_version}` : "";
    }
  }

  async function loadPair(prompt) {
    if (!prompt) return;
    $("pair-prompt").value = prompt;
    $("pair-question").textContent = prompt;
    state.pair = null;
    choose(null);
    showPair(null);
    const box = $("pair");
    box.setAttribute("aria-busy", "true");
    say("Getting two answers...", "answering", "");
    let resp;
    try {
      resp = await fetch(policyUrl("/generate_pair"), {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify({ inputs: prompt }),
      });
    } catch (e) {
      box.setAttribute("aria-busy", "false");
      say("Could not reach the model: check your connection, or ask the operator (policy URL).", "network", "bad");
      return;
    }
    box.setAttribute("aria-busy", "false");
    if (!resp.ok) {
      const [kind, message] = await explain(resp, "questions");
      say(message, kind, "bad");
      return;
    }
    state.pair = await resp.json();
    box.dataset.pairId = state.pair.pair_id;
    $("side-a").dataset.interactionId = state.pair.a.interaction_id;
    $("side-b").dataset.interactionId = state.pair.b.interaction_id;
    showPair(state.pair);
    box.focus();
    const before = state.recorded ? `Recorded: ${state.recorded}. ` : "";
    state.recorded = null;
    say(before + "Which answer is better? Press 1 for A, 2 for B, 3 if they are about the same.", "pair_ready", "");
  }

  async function pick(which) {
    const pair = state.pair;
    if (!pair || state.picking) return;
    choose(which);
    state.picking = true;
    try {
      const outcome = await sendFeedback({ pair_id: pair.pair_id, feedback_token: pair.feedback_token, preference: which });
      if (!counted(outcome) && outcome !== "already_voted") return; // stay on this pair: the message says why
      state.compared++;
      state.recorded = which === "TIE" ? "about the same" : `${which} is better`;
      $("done-count").textContent = `Compared so far: ${state.compared}.`;
      $("pair").dataset.compared = String(state.compared);
    } finally {
      state.picking = false;
    }
    await loadPair(nextPrompt());
  }

  const KEYS = { 1: "A", 2: "B", 3: "TIE", ArrowLeft: "A", ArrowRight: "B", ArrowDown: "TIE" };

  function onKey(event) {
    if ($("compare").hidden || event.altKey || event.ctrlKey || event.metaKey) return;
    const tag = event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA") return; // typing a question
    const which = KEYS[event.key];
    if (which && event.key.length === 1) {
      event.preventDefault();
      pick(which);
    } else if (which) {
      event.preventDefault();
      if (state.pair) choose(which); // arrows choose; Enter confirms
    } else if (event.key === "Enter" && tag !== "BUTTON" && state.choice) {
      event.preventDefault();
      pick(state.choice);
    } else if (event.key === "n" || event.key === "N") {
      event.preventDefault();
      loadPair(nextPrompt());
    }
  }

  // ------------------------------------------------------------------ modes and start-up
  function setMode(mode) {
    const compare = mode === "compare";
    $("chat").hidden = compare;
    $("compare").hidden = !compare;
    $("mode-chat").setAttribute("aria-pressed", String(!compare));
    $("mode-compare").setAttribute("aria-pressed", String(compare));
    history.replaceState(null, "", location.pathname + location.search + (compare ? "#compare" : ""));
    if (compare && !state.pair) loadPair(nextPrompt());
    else if (compare) $("pair").focus();
    else $("prompt").focus();
  }

  async function loadConfig() {
    const resp = await fetch("config.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`config.json: HTTP ${resp.status}`);
    Object.assign(state.config, await resp.json());
  }

  function wire() {
    $("ask").addEventListener("submit", (event) => {
      event.preventDefault();
      const prompt = $("prompt").value.trim();
      if (!prompt) return;
      $("prompt").value = "";
      ask(prompt);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        $("ask").requestSubmit();
      }
    });
    $("answers").addEventListener("click", onAnswerClick);
    $("answers").addEventListener("submit", onEditSubmit);
    $("pair-ask").addEventListener("submit", (event) => {
      event.preventDefault();
      loadPair($("pair-prompt").value.trim());
    });
    $("pair-next").addEventListener("click", () => loadPair(nextPrompt()));
    for (const b of document.querySelectorAll(".choices button")) {
      b.addEventListener("click", () => pick(b.dataset.pick));
    }
    $("mode-chat").addEventListener("click", () => setMode("chat"));
    $("mode-compare").addEventListener("click", () => setMode("compare"));
    document.addEventListener("keydown", onKey);
  }

  async function start() {
    identify();
    wire();
    try {
      await loadConfig();
    } catch (e) {
      say(`The page could not load its settings (${e.message}): reload it.`, "config", "bad");
      return;
    }
    if (state.config.session_required && !state.session) {
      say("This page needs a link from your application (with a session) before you can ask or rate.", "no_session", "bad");
      document.querySelectorAll("main button, main textarea, main input").forEach((el) => (el.disabled = true));
      return;
    }
    document.body.dataset.ready = "true";
    setMode(location.hash === "#compare" ? "compare" : "chat");
  }

  start();
})();
