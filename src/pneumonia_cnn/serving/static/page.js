// Script of index.html, served as /page.js (the Content-Security-Policy allows script-src 'self' only).
// Everything the server or the user supplies reaches the page through textContent, never innerHTML.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const drop = $("drop"), input = $("file"), keyform = $("keyform"), keyinput = $("apikey");
  const KEY = "pneumonia-cnn-key";
  const TIMEOUT_S = 120;  // a request with no answer by then is aborted, and the page says so
  // Bidirectional controls (right-to-left override, isolates, marks): in a file name they reordered the whole
  // result line ("\u202egpj.exe.jpeg" showed "gepj.exe.jpg" and the probability "%4.3"). Shown as "?", as the
  // server shows the control characters of a name.
  const BIDI_CONTROLS = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/g;
  const nameOf = file => String(file.name).replace(BIDI_CONTROLS, "?");

  // --- the API key --------------------------------------------------------------------------------------------
  // What a key can hold: serving/auth.py makes keys "ID.SECRET", the id of letters, digits, "-" and "_" (KEY_ID),
  // the secret from secrets.token_urlsafe (the same alphabet), and reads the header as Latin-1 text. Any other
  // character is no key's; one beyond Latin-1 even made fetch throw before sending (a header is a byte string).
  const KEY_CHARACTER = /^[A-Za-z0-9._-]$/;
  // Around a pasted key: white space, and the invisible characters that e-mail and chat programs insert (zero-width
  // space and joiners, word joiner, byte-order mark), which String.trim() leaves in place.
  const AROUND_KEY = /^[\s\u200B-\u200D\u2060\uFEFF]+|[\s\u200B-\u200D\u2060\uFEFF]+$/g;

  function describeCharacter(c) {
    const code = "U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    if (c === " ") { return "a space (" + code + ")"; }
    return /^[\p{L}\p{N}\p{P}\p{S}]$/u.test(c) ? "\u201c" + c + "\u201d " + code : code + " (invisible)";
  }
  // The characters of ``key`` that no API key holds, described ("“к” U+043A, U+200B (invisible)"); "" if none.
  function badCharacters(key) {
    const bad = [...new Set(Array.from(key).filter(c => !KEY_CHARACTER.test(c)))];
    return bad.slice(0, 6).map(describeCharacter).join(", ") + (bad.length > 6 ? ", \u2026" : "");
  }
  // The key kept in this tab's session storage only (sent as "Authorization: Bearer KEY"); "" when none. A key
  // that no key can be (kept by an older version of this page) is dropped: fetch would throw on it.
  function storedKey() {
    const key = sessionStorage.getItem(KEY) || "";
    if (key && badCharacters(key)) { sessionStorage.removeItem(KEY); return ""; }
    return key;
  }
  function headers() {
    const key = storedKey();
    return key ? { "Authorization": "Bearer " + key } : {};
  }
  function askForKey(message) {
    keyform.className = "shown";
    $("keyok").textContent = "";
    $("keymessage").textContent = message || "";
    keyinput.focus();
  }
  // A 401: ``sent`` tells whether the request carried a key (none at all is not a key refused: the server said
  // "missing API key"); ``needed``: what to say then (the form's label already says that a key is needed).
  function keyRefused(sent, needed) {
    askForKey(sent ? "Key not accepted: check it, or ask for a new one." : needed);
  }
  keyform.addEventListener("submit", ev => {
    ev.preventDefault();
    const key = keyinput.value.replace(AROUND_KEY, "");
    keyinput.value = "";
    const bad = badCharacters(key);
    if (!key || bad) {  // never stored: paste it again
      askForKey(key ? "This key holds characters an API key cannot have (" + bad + "): an API key is ID.SECRET, " +
        "of letters, digits, \u201c-\u201d, \u201c_\u201d and a dot. Paste it again." : "Enter the key (ID.SECRET).");
      return;
    }
    sessionStorage.setItem(KEY, key);
    $("error").textContent = "";  // the refusal that asked for a key is answered
    $("keymessage").textContent = "Checking the key\u2026";
    loadModel(true);
  });

  // --- requests -----------------------------------------------------------------------------------------------
  // A reply as {ok, status, body}: body is the parsed JSON, or null when the reply was not JSON (a proxy's
  // HTML error page, a truncated body). Throws only when the network failed or the request was aborted.
  async function readReply(response) {
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (e) { body = null; }
    return { ok: response.ok, status: response.status, reason: response.statusText, body: body };
  }
  // fetch + readReply, aborted through ``controller`` after TIMEOUT_S; the error then has ``timeout`` set.
  async function fetchReply(url, init, controller) {
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, TIMEOUT_S * 1000);
    try {
      return await readReply(await fetch(url, Object.assign({}, init, { signal: controller.signal })));
    } catch (e) {
      if (!timedOut) { throw e; }
      const late = new Error("no answer from the server after " + TIMEOUT_S + " s");
      late.timeout = true;
      throw late;
    } finally { clearTimeout(timer); }
  }
  function unreachable(e) {
    if (e && e.timeout) { return e.message; }
    return "the server could not be reached (" + (e && e.message ? e.message : "network error") + ")";
  }
  function describe(reply) {
    const status = "HTTP " + reply.status + (reply.reason ? " " + reply.reason : "");
    if (reply.body === null || typeof reply.body !== "object") {
      return status + ": the reply was not a JSON answer from pneumonia-cnn (a proxy or network error?)";
    }
    const detail = reply.body.detail;
    if (detail === undefined || detail === null || detail === "") { return status; }
    return status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail));
  }

  // ``keyEntered``: called by the key form, which then learns whether the key works. Only the latest check's
  // answer counts: a wrong key's late 401 had asked for a key again after the next key was accepted.
  let latestModel = 0;
  async function loadModel(keyEntered) {
    const mine = ++latestModel;
    const auth = headers();
    let reply;
    try {
      reply = await fetchReply("model", { headers: auth }, new AbortController());
    } catch (e) {
      if (mine !== latestModel) { return; }
      $("modelinfo").textContent = " (model information unavailable: " + unreachable(e) + ")";
      if (keyEntered) { $("keymessage").textContent = "The key could not be checked: " + unreachable(e) + "."; }
      return;
    }
    if (mine !== latestModel) { return; }
    if (reply.status === 401) { keyRefused("Authorization" in auth, ""); return; }
    if (keyEntered && !reply.ok) { $("keymessage").textContent = "The key could not be checked: " + describe(reply); }
    if (reply.ok || !keyEntered) { keyform.className = ""; }
    if (keyEntered && reply.ok) {  // the form goes: the focus moves on to what comes next, the drop zone
      $("keyok").textContent = "Key accepted.";
      drop.focus();
    }
    showModel(reply);
  }
  function showModel(reply) {
    const m = reply.body;
    if (!reply.ok || !m || !Array.isArray(m.model) || !m.preprocessing || !Array.isArray(m.preprocessing.size)) {
      $("modelinfo").textContent = " (model information unavailable: " + describe(reply) + ")";
      return;
    }
    $("modelinfo").textContent = " Model: " + m.model.join("+") + ", input " + m.preprocessing.size.join("x") + ".";
  }

  // --- results ------------------------------------------------------------------------------------------------
  // Only the latest request's answer is ever displayed: each send takes the next sequence number, and an
  // answer whose number is no longer the latest is dropped (its request is also aborted, so that the server
  // stops working on it: an abandoned Grad-CAM request is not left in the queue).
  let latest = 0, inFlight = null;

  function clearResult() {
    $("result").className = "";
    const warning = $("warning");
    warning.className = ""; warning.textContent = "";
    $("filename").textContent = "";
    $("probability").textContent = "\u2013";
    const label = $("label");
    label.textContent = "\u2013"; label.className = "";
    $("threshold").textContent = "";
    $("rate").textContent = "";
    $("notes").textContent = "";
    $("heatmap").removeAttribute("src");
    $("heatmapbox").className = "";
  }
  function showError(message) {
    $("status").textContent = "";
    $("error").textContent = "Error: " + message;
  }
  // Called the moment a new file is chosen or dropped, or a drop is refused: nothing of the previous
  // image stays on screen, and any request still in flight is abandoned.
  function startOver() {
    latest += 1;
    if (inFlight) { inFlight.abort(); inFlight = null; }
    clearResult();
    $("status").textContent = "";
    $("error").textContent = "";
    $("keyok").textContent = "";
    return latest;
  }

  // Probability and threshold as percentages with the same number of decimals: one more (up to three) while
  // they would read the same and yet differ, so that the label never seems to contradict the numbers.
  function percents(probability, threshold) {
    if (typeof threshold !== "number") { return [(100 * probability).toFixed(1) + "%", "?"]; }
    let digits = 1;
    while (digits < 3 && probability !== threshold &&
           (100 * probability).toFixed(digits) === (100 * threshold).toFixed(digits)) { digits += 1; }
    return [probability, threshold].map(x => (100 * x).toFixed(digits) + "%");
  }
  // The warning above the number: "outside" for an image flagged out of the intended use, "note" for a warning
  // that does not flag it (a DICOM secondary capture: check what it holds), "" for none. The server's own reasons
  // may already say that the probability is not reliable: then the page does not say it a second time.
  function showWarning(body) {
    const warnings = Array.isArray(body.warnings) ? body.warnings.map(String) : [];
    const kind = body.in_distribution === false ? "outside" : warnings.length > 0 ? "note" : "";
    const reasons = warnings.join("; ") || "this image is unlike the X-rays the model was trained on";
    const said = /not reliable|do not rely/i.test(reasons);
    $("warning").textContent = kind === "outside" ? "\u26a0 Outside the intended use: " + reasons +
      (said ? "." : ". Do not rely on this probability.") : kind === "note" ? "\u26a0 Note: " + reasons + "." : "";
    $("warning").className = kind ? "shown " + kind : "";
    return kind;
  }
  // ``name``: the browser's own name of the file (the server's echo of it is percent-encoded by the browser's
  // multipart rules, and cut at "\").
  function showResult(body, name) {
    const warned = showWarning(body);
    $("filename").textContent = name;
    const [probability, threshold] = percents(body.probability, body.threshold);
    $("probability").textContent = probability;
    const label = $("label");
    const shownLabel = body.label === null ? "no label (not a chest X-ray)" : String(body.label);
    label.textContent = shownLabel;
    label.className = body.label === "PNEUMONIA" || body.label === "NORMAL" ? body.label : "";
    $("threshold").textContent = threshold;
    showRate(body);
    // no map for an image given no label: it would point at a finding in what is not a chest X-ray
    if (body.label !== null && typeof body.gradcam_png_base64 === "string" && body.gradcam_png_base64) {
      $("heatmap").src = "data:image/png;base64," + body.gradcam_png_base64;
      $("heatmapbox").className = "shown";
    }
    $("error").textContent = "";
    // the live status says what came of it (emptied, it announced nothing)
    $("status").textContent = name + " analysed: probability of pneumonia " + probability + (body.label === null ?
      ", no label: not a chest X-ray (see the warning)." : ", label " + shownLabel +
      (warned === "outside" ? " (outside the intended use: see the warning)." : warned ? " (see the note)." : "."));
    $("result").className = "shown";
  }
  // The pneumonia rate the probability is stated for, and where it came from (the same X-ray reads 99.8% at the
  // calibration images' 75% and 95% at a given 10%), then the server's notes on the answer.
  function showRate(body) {
    if (typeof body.prevalence === "number") {
      const source = typeof body.prevalence_source === "string" ? body.prevalence_source : "";
      $("rate").textContent = "Stated for a pneumonia rate of " + (100 * body.prevalence).toFixed(1) + "%" +
        (source ? " (" + source + ")" : "") + ".";
    }
    // a note already said as the rate's source (a single image under --prevalence estimate) is not said twice
    const notes = (Array.isArray(body.notes) ? body.notes.map(String) : []).filter(n => n !== body.prevalence_source);
    $("notes").textContent = notes.length ? "Note: " + notes.join("; ") + "." : "";
  }
  function isAnswer(body) {
    // a null label: an image that is not an X-ray, scored but given no label
    return Boolean(body && typeof body === "object" && typeof body.probability === "number" &&
                   (body.label === null || (typeof body.label === "string" && body.label)) &&
                   typeof body.filename === "string");
  }

  async function send(file) {
    const mine = startOver();
    const controller = new AbortController();
    inFlight = controller;
    const name = nameOf(file);
    $("status").textContent = "Analysing " + name + " ...";
    const form = new FormData();
    form.append("file", file);
    const auth = headers();
    let reply;
    try {
      reply = await fetchReply("predict?gradcam=true", { method: "POST", body: form, headers: auth }, controller);
    } catch (e) {
      if (inFlight === controller) { inFlight = null; }  // never a newer request's controller
      if (mine !== latest) { return; }  // aborted or overtaken by a newer file: not this request's page any more
      showError(name + " was not analysed: " + unreachable(e) + ".");
      return;
    }
    if (inFlight === controller) { inFlight = null; }
    if (mine !== latest) { return; }  // an answer to a file that is no longer the one chosen: never shown
    if (reply.status === 401) {
      keyRefused("Authorization" in auth, "This service needs an API key: enter it, then choose the file again.");
    }
    if (!reply.ok || !isAnswer(reply.body)) { showError(name + " was not analysed: " + describe(reply)); return; }
    showResult(reply.body, name);
  }

  // --- choosing a file ----------------------------------------------------------------------------------------
  // #drop is a button: a click, or Enter or Space while it has the focus, opens the chooser.
  drop.addEventListener("click", () => input.click());
  ["dragenter", "dragover"].forEach(e => drop.addEventListener(e, ev => {
    ev.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach(e => drop.addEventListener(e, ev => {
    ev.preventDefault(); drop.classList.remove("over");
  }));
  // Several files dropped at once are refused, not reduced to one: which file a browser lists "first" is
  // not something the user can see, and a result under a name they did not pick is the error this page
  // must not make. The message asks for one file at a time; nothing is sent.
  drop.addEventListener("drop", ev => {
    const files = ev.dataTransfer ? ev.dataTransfer.files : null;
    if (!files || !files.length) { return; }
    if (files.length > 1) {
      startOver();
      showError(files.length + " files dropped: none was analysed. Drop one X-ray at a time.");
      return;
    }
    send(files[0]);
  });
  input.addEventListener("change", () => {
    const file = input.files.length ? input.files[0] : null;
    input.value = "";  // so that choosing the same file again fires "change" and sends it again
    if (file) { send(file); }
  });

  loadModel(false);
})();
