// Script of index.html, served as /page.js (the Content-Security-Policy allows script-src 'self' only).
// Everything the server or the user supplies reaches the page through textContent, never innerHTML.
"use strict";
(function () {
  const $ = id => document.getElementById(id);
  const drop = $("drop"), input = $("file"), keyform = $("keyform"), keyinput = $("apikey");
  const KEY = "pneumonia-cnn-key";

  // The key stays in this tab's session storage only; it is sent as "Authorization: Bearer KEY".
  function headers() {
    const key = sessionStorage.getItem(KEY);
    return key ? { "Authorization": "Bearer " + key } : {};
  }
  function askForKey(message) {
    keyform.className = "shown";
    $("keymessage").textContent = message || "";
    keyinput.focus();
  }
  keyform.addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, keyinput.value.trim());
    keyinput.value = "";
    loadModel();
  });

  // A reply as {ok, status, body}: body is the parsed JSON, or null when the reply was not JSON (a proxy's
  // HTML error page, a truncated body). Throws only when the network failed or the request was aborted.
  async function readReply(response) {
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (e) { body = null; }
    return { ok: response.ok, status: response.status, reason: response.statusText, body: body };
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

  async function loadModel() {
    let reply;
    try {
      reply = await readReply(await fetch("model", { headers: headers() }));
    } catch (e) {
      $("modelinfo").textContent = " (model information unavailable: the server could not be reached)";
      return;
    }
    if (reply.status === 401) { askForKey(sessionStorage.getItem(KEY) ? "Key not accepted." : ""); return; }
    keyform.className = "";
    const m = reply.body;
    if (!reply.ok || !m || !Array.isArray(m.model) || !m.preprocessing || !Array.isArray(m.preprocessing.size)) {
      $("modelinfo").textContent = " (model information unavailable: " + describe(reply) + ")";
      return;
    }
    $("modelinfo").textContent = " Model: " + m.model.join("+") + ", input " + m.preprocessing.size.join("x") + ".";
  }

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
    return latest;
  }

  function showResult(body) {
    const warning = $("warning");
    const warnings = Array.isArray(body.warnings) ? body.warnings : [];
    const outside = body.in_distribution === false || warnings.length > 0;
    warning.className = outside ? "shown" : "";
    warning.textContent = outside ? "\u26a0 Outside the intended use: " + (warnings.join("; ") ||
        "this image is unlike the X-rays the model was trained on") + ". Do not rely on this probability." : "";
    $("filename").textContent = String(body.filename);
    $("probability").textContent = (100 * body.probability).toFixed(1) + "%";
    const label = $("label");
    label.textContent = String(body.label);
    label.className = body.label === "PNEUMONIA" || body.label === "NORMAL" ? body.label : "";
    $("threshold").textContent = typeof body.threshold === "number" ? body.threshold.toFixed(3) : "?";
    if (typeof body.gradcam_png_base64 === "string" && body.gradcam_png_base64) {
      $("heatmap").src = "data:image/png;base64," + body.gradcam_png_base64;
      $("heatmapbox").className = "shown";
    }
    $("status").textContent = "";
    $("error").textContent = "";
    $("result").className = "shown";
  }

  async function send(file) {
    const mine = startOver();
    const controller = new AbortController();
    inFlight = controller;
    $("status").textContent = "Analysing " + file.name + " ...";
    const form = new FormData();
    form.append("file", file);
    let reply;
    try {
      const response = await fetch("predict?gradcam=true",
                                   { method: "POST", body: form, headers: headers(), signal: controller.signal });
      reply = await readReply(response);
    } catch (e) {
      if (inFlight === controller) { inFlight = null; }  // never a newer request's controller
      if (mine !== latest) { return; }  // aborted or overtaken by a newer file: not this request's page any more
      showError(file.name + " was not analysed: the server could not be reached (" +
                (e && e.message ? e.message : "network error") + ").");
      return;
    }
    if (inFlight === controller) { inFlight = null; }
    if (mine !== latest) { return; }  // an answer to a file that is no longer the one chosen: never shown
    if (reply.status === 401) { askForKey("Key not accepted."); }
    if (!reply.ok) { showError(file.name + " was not analysed: " + describe(reply)); return; }
    const body = reply.body;
    if (!body || typeof body !== "object" || typeof body.probability !== "number" || !body.label ||
        typeof body.filename !== "string") {
      showError(file.name + " was not analysed: " + describe(reply));
      return;
    }
    showResult(body);
  }

  ["dragenter", "dragover"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.remove("over"); }));
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

  loadModel();
})();
