// The demo page: language pickers from GET /v1/models, POST /v1/translate, the result and its attention heatmap.
// Plain ES module, no dependencies; everything from the API is written with textContent, never as HTML.

const WORD_START = "\u2581"; // SentencePiece's word-boundary marker "▁", as in service/engine.py
const LOAD_RETRY_S = 2; // how soon to ask /v1/models again when it fails without a Retry-After

const $ = (id) => document.getElementById(id);
const form = $("translate-form");
const fields = {
  text: $("text"),
  source: $("source"),
  target: $("target"),
  beamSize: $("beam-size"),
  nBest: $("n-best"),
  attention: $("attention"),
};
const button = $("translate");
const results = $("results");

let models = []; // GET /v1/models → models
let shown = null; // the attention of the result on screen, redrawn when the view toggle changes
// Language names in the reader's language ("German" for "de"); a code the browser does not know stays a code.
const languageNames = new Intl.DisplayNames([...navigator.languages, "en"], { type: "language", fallback: "code" });

class ApiError extends Error {}

// ---- HTTP ----------------------------------------------------------------------------------------------

/** fetch() that returns the JSON body or throws an ApiError whose message is fit to show. */
async function callApi(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { Accept: "application/json", ...init.headers } });
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}): check that it is running, then try again.`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null; // not JSON: a proxy's error page, say; described below from the raw text
  }
  if (!response.ok) {
    const error = new ApiError(describeError(response, body, text));
    error.status = response.status;
    error.detail = typeof body?.detail === "string" ? body.detail : "";
    error.retryAfter = Number(response.headers.get("Retry-After")) || null;
    throw error;
  }
  if (body === null) {
    throw new ApiError(`The server answered HTTP ${response.status} without a JSON body.`);
  }
  return body;
}

/** "Error 422: beam_size: Input should be …" from the API's {detail, request_id} body. */
function describeError(response, body, text) {
  let detail = body?.detail;
  if (Array.isArray(detail)) {
    detail = detail.map((d) => (d.loc?.length ? `${d.loc.join(".")}: ${d.msg}` : d.msg)).join("; ");
  } else if (typeof detail !== "string") {
    detail = text.trim().slice(0, 300) || response.statusText || "no details";
  }
  let message = `Error ${response.status}: ${detail}`;
  const retry = response.headers.get("Retry-After");
  if (retry) message += ` (retry after ${retry} s)`;
  if (body?.request_id) message += ` [request id ${body.request_id}]`;
  return message;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.textContent = "";
  box.hidden = true;
}

// ---- Language pickers ------------------------------------------------------------------------------------

async function loadModels() {
  try {
    models = (await callApi("/v1/models")).models;
  } catch (err) {
    const wait = err.retryAfter ?? LOAD_RETRY_S;
    showError(`${err.message} Asking again in ${wait} s.`);
    setTimeout(loadModels, wait * 1000);
    return;
  }
  clearError();
  if (!models.length) {
    showError("The server has no models loaded.");
    return;
  }
  const sources = [...new Set(models.map((m) => m.source))];
  fillSelect(fields.source, sources);
  fillTargets();
  fields.source.disabled = fields.target.disabled = button.disabled = false;
}

/** "German (de)"; just the code when the browser has no name for it. */
function languageLabel(code) {
  let name = code;
  try {
    name = languageNames.of(code) ?? code;
  } catch {
    name = code; // not a well-formed tag
  }
  return name.toLowerCase() === code.toLowerCase() ? code : `${name} (${code})`;
}

function fillSelect(select, values) {
  const previous = select.value;
  select.replaceChildren(...values.map((value) => new Option(languageLabel(value), value)));
  if (values.includes(previous)) select.value = previous;
}

function fillTargets() {
  const targets = models.filter((m) => m.source === fields.source.value).map((m) => m.target);
  fillSelect(fields.target, [...new Set(targets)]);
  describeModel();
}

function describeModel() {
  const model = models.find((m) => m.source === fields.source.value && m.target === fields.target.value);
  if (!model) return;
  const bleu = model.bleu == null ? "" : `, validation BLEU ${model.bleu.toFixed(1)}`;
  $("model-info").textContent =
    `Model ${model.name}: ${languageLabel(model.source)} → ${languageLabel(model.target)} ` +
    `(${model.variant} on ${model.device}${bleu})`;
}

// ---- Translating -----------------------------------------------------------------------------------------

function setBusy(busy) {
  button.disabled = busy;
  button.textContent = busy ? "Translating…" : "Translate";
  form.setAttribute("aria-busy", String(busy));
  if (busy) announce("Translating…");
}

/** Tells screen readers the outcome in one short line (the results section itself is too long to read out). */
function announce(message) {
  $("status").textContent = message;
}

async function translate(event) {
  event.preventDefault();
  clearError();
  setBusy(true);
  const body = {
    text: fields.text.value,
    source: fields.source.value || null,
    target: fields.target.value || null,
    beam_size: Number(fields.beamSize.value),
    n_best: Number(fields.nBest.value),
    return_scores: true,
    return_attention: fields.attention.checked,
  };
  let note = "";
  try {
    let data;
    try {
      data = await post(body);
    } catch (err) {
      // Too much attention for one response (a long text): translate it anyway, without the heatmap.
      if (!(err.status === 413 && body.return_attention && err.detail.includes("return_attention"))) throw err;
      data = await post({ ...body, return_attention: false });
      note = "This text is too long for an attention heatmap, so it was translated without one.";
    }
    showResult(data.translations[0], body.target, note);
  } catch (err) {
    results.hidden = true; // no stale result next to the error
    shown = null;
    announce("Translation failed.");
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function post(body) {
  return callApi("/v1/translate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function showResult(translation, target, note = "") {
  const out = $("translation");
  out.textContent = translation.text;
  out.lang = target ?? "";
  $("score").textContent =
    translation.score == null ? "" : `Score (log-probability / length penalty): ${translation.score.toFixed(4)}`;
  const alternatives = translation.alternatives ?? [];
  $("alternatives").replaceChildren(
    ...alternatives.map((alt) => {
      const item = document.createElement("li");
      item.append(span(alt.text, "alt-text"), " ", span(alt.score.toFixed(4), "alt-score"));
      return item;
    }),
  );
  $("alternatives-block").hidden = alternatives.length === 0;
  $("note").textContent = note;
  $("note").hidden = !note;
  shown = translation.attention ?? null;
  $("attention-block").hidden = shown === null;
  $("cell-info").textContent = "";
  drawHeatmap();
  results.hidden = false;
  announce(`Translation: ${translation.text}`);
}

// ---- Attention heatmap -----------------------------------------------------------------------------------

/** The word of each subword piece: a piece that starts with "▁" starts a new word (as the server counts). */
function wordIndex(pieces) {
  let word = 0;
  return pieces.map((piece, i) => (i > 0 && piece.startsWith(WORD_START) ? ++word : word));
}

function wordLabels(pieces, index) {
  const words = [];
  pieces.forEach((piece, i) => {
    words[index[i]] = (words[index[i]] ?? "") + piece.replaceAll(WORD_START, "");
  });
  return words;
}

/**
 * Word-level attention from subword attention: a cell sums the weights over the source word's subwords and
 * averages them over the target word's subwords, so each row is still a distribution over source words. The
 * API's alignment (each target word's most attended source word) marks one cell per row.
 */
function toWords(attention) {
  const src = wordIndex(attention.source_tokens);
  const tgt = wordIndex(attention.target_tokens);
  const cols = wordLabels(attention.source_tokens, src);
  const rows = wordLabels(attention.target_tokens, tgt);
  const weights = rows.map(() => cols.map(() => 0)); // (target words, source words)
  const pieces = rows.map(() => 0);
  attention.weights.forEach((row, i) => {
    pieces[tgt[i]] += 1;
    row.forEach((w, j) => {
      weights[tgt[i]][src[j]] += w;
    });
  });
  weights.forEach((row, t) => row.forEach((w, s) => (row[s] = w / pieces[t])));
  const marked = new Set(attention.alignment.map(([s, t]) => `${t},${s}`));
  return { rows, cols, weights, marked };
}

function currentView() {
  return document.querySelector('input[name="view"]:checked').value;
}

function drawHeatmap() {
  const table = $("heatmap");
  if (!shown || !shown.target_tokens.length || !shown.source_tokens.length) {
    table.replaceChildren();
    table.dataset.view = "";
    return;
  }
  const view = currentView();
  const grid =
    view === "word"
      ? toWords(shown)
      : { rows: shown.target_tokens, cols: shown.source_tokens, weights: shown.weights, marked: new Set() };

  const caption = document.createElement("caption");
  caption.className = "sr-only";
  caption.textContent = `Attention (${view} level): ${grid.rows.length} target by ${grid.cols.length} source tokens`;

  const head = document.createElement("tr");
  const corner = document.createElement("th");
  corner.className = "corner";
  corner.scope = "col";
  corner.textContent = "target ↓ source →";
  head.append(corner, ...grid.cols.map((token) => headerCell(token, "col")));

  const body = grid.rows.map((token, t) => {
    const tr = document.createElement("tr");
    tr.append(headerCell(token, "row"));
    grid.weights[t].forEach((w, s) =>
      tr.append(weightCell(w, shownToken(token), shownToken(grid.cols[s]), grid.marked.has(`${t},${s}`))),
    );
    return tr;
  });

  const thead = document.createElement("thead");
  thead.append(head);
  const tbody = document.createElement("tbody");
  tbody.append(...body);
  table.replaceChildren(caption, thead, tbody);
  table.dataset.view = view;
}

function span(text, className) {
  const element = document.createElement("span");
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

/** A subword as shown: without SentencePiece's "▁" word-start mark (drawn as a left border instead). */
function shownToken(token) {
  return token.replaceAll(WORD_START, "") || "␣";
}

function headerCell(token, scope) {
  const th = document.createElement("th");
  th.scope = scope;
  th.dataset.token = token; // the subword as the API returned it
  if (token.startsWith(WORD_START)) th.classList.add("word-start");
  th.append(span(shownToken(token)));
  return th;
}

function weightCell(weight, target, source, aligned) {
  const td = document.createElement("td");
  td.style.setProperty("--w", weight.toFixed(4));
  td.dataset.weight = String(weight);
  td.title = `${target} ← ${source}: ${weight.toFixed(4)}`; // hover; a tap shows it in #cell-info
  if (aligned) td.classList.add("aligned");
  td.append(span(weight.toFixed(2), "sr-only"));
  return td;
}

// ---- Wiring ----------------------------------------------------------------------------------------------

form.addEventListener("submit", translate);
fields.source.addEventListener("change", fillTargets);
fields.target.addEventListener("change", describeModel);
fields.beamSize.addEventListener("input", () => {
  // n-best may not exceed the beam; the browser then says so before the request is sent
  const beam = Number(fields.beamSize.value);
  if (Number.isInteger(beam) && beam >= 1) fields.nBest.max = String(beam);
});
fields.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
// Touch screens have no hover: a tap (or click) on a cell writes its value under the heatmap.
$("heatmap").addEventListener("click", (event) => {
  const cell = event.target.closest("td");
  if (cell) $("cell-info").textContent = cell.title;
});
for (const radio of document.querySelectorAll('input[name="view"]')) {
  radio.addEventListener("change", drawHeatmap);
}

loadModels();
