// The lcpn page: classify dropped or chosen images through /v1/predict, then ask /v1/explain for
// each image's Grad-CAM heatmaps (when /v1/model says the server can explain); a second tab shows
// the class tree from /v1/model.
// Plain DOM code, no build step and nothing fetched from elsewhere: it works offline.
"use strict";

const $ = (selector) => document.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;

// --- API, with the bearer token when the server asks for one --------------------------------------
function tokenHeaders() {
  const token = sessionStorage.getItem("lcpn-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...tokenHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("#token-box").hidden = false;
    $("#token").focus();
    throw new ApiError("This server needs a token: enter it above and try again.");
  }
  const body = await response.json().catch(() => ({}));
  // predict answers every file even when some failed (413/422 with per-file errors).
  if (!response.ok && !body.predictions) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
    throw new ApiError(`${response.status}: ${detail}`);
  }
  return body;
}

$("#token-box").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("lcpn-token", $("#token").value.trim());
  $("#token-box").hidden = true;
  modelLoaded = loadModel();
});

// --- tabs (arrow keys move between them, as in the WAI-ARIA tabs pattern) -------------------------
const tabs = [...document.querySelectorAll('[role="tab"]')];
function selectTab(tab) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
  tab.focus();
}
for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (step) selectTab(tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length]);
  });
}

// --- classify ---------------------------------------------------------------------------------------
const drop = $("#drop");
$("#files").addEventListener("change", (event) => classify([...event.target.files]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classify([...event.dataTransfer.files]);
});

async function classify(files) {
  if (!files.length) return;
  const cards = files.map(newCard);
  $("#results").prepend(...cards.map((c) => c.root));
  $("#status").textContent = `Classifying ${files.length} image(s)…`;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  let body;
  try {
    body = await api(`/v1/predict?top_k=${$("#top-k").value}`, { method: "POST", body: form });
  } catch (error) {
    for (const card of cards) showError(card, error.message);
    $("#status").textContent = error.message;
    return;
  }
  body.predictions.forEach((prediction, i) => showPrediction(cards[i], prediction));
  const failed = body.errors.length;
  $("#status").textContent = `${files.length - failed} classified${failed ? `, ${failed} could not be used` : ""}.`;
  const model = await modelLoaded;
  for (const [i, prediction] of body.predictions.entries()) {
    if (prediction.error) continue;
    if (model && model.explanations === false) {
      noHeatmaps(cards[i], `this server runs the ${model.runtime} export; heatmaps need the trained PyTorch models.`);
    } else {
      await explain(cards[i], files[i]);
    }
  }
}

function newCard(file) {
  const photo = el("img", { class: "photo", alt: `Uploaded image ${file.name}` });
  photo.src = URL.createObjectURL(file);
  const heat = el("img", { class: "heat", alt: "", hidden: "" });
  const root = el("li", { class: "card", "data-file": file.name, "aria-busy": "true" },
    el("h2", { text: file.name }), el("figure", { class: "picture" }, photo, heat));
  return { root, heat, body: root.appendChild(el("div", { text: "Classifying…", class: "muted" })) };
}

function showError(card, message) {
  card.root.removeAttribute("aria-busy");
  card.body.replaceChildren(el("p", { class: "error", role: "alert", text: message }));
}

function showPrediction(card, prediction) {
  if (prediction.error) return showError(card, prediction.error);
  card.root.dataset.path = prediction.path.join(" > ");
  const levels = el("ol", { class: "levels", "aria-label": "Predicted path" });
  prediction.path.forEach((name, i) => {
    const p = prediction.confidences[i];
    const bar = el("span");
    bar.style.width = percent(p);
    levels.append(el("li", {},
      el("span", { class: "name", text: name }),
      el("span", { class: "bar", role: "img", "aria-label": `confidence ${percent(p)}` }, bar),
      el("span", { class: "num", text: percent(p) })));
  });
  const parts = [levels];
  if (prediction.attributes) {  // product attributes (gender, colour, ...) beside the path
    parts.push(el("ul", { class: "attributes", "aria-label": "Attributes" },
      ...Object.entries(prediction.attributes).map(([name, a]) => el("li", { "data-attribute": name },
        el("span", { class: "name", text: `${name}: ` }), `${a.label} (${percent(a.confidence)})`))));
  }
  if (prediction.stopped_early) parts.push(el("p", { class: "muted", text: "Stopped early: unsure below this level." }));
  if (prediction.top_k.length > 1) {
    parts.push(el("ol", { class: "topk", "aria-label": "Most probable paths" },
      ...prediction.top_k.map((t) => el("li", { text: `${t.path.join(" > ")} (${percent(t.probability)})` }))));
  }
  card.stages = el("div", { class: "stages", "aria-label": "Heatmaps per stage" },
    el("span", { class: "note", text: "Computing heatmaps…" }));
  parts.push(card.stages);
  card.body.replaceChildren(...parts);
  card.body.classList.remove("muted");
}

function noHeatmaps(card, why) {
  card.stages.replaceChildren(el("span", { class: "note error", text: `No heatmaps: ${why}` }));
  card.root.removeAttribute("aria-busy");
}

async function explain(card, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    body = await api("/v1/explain", { method: "POST", body: form });
  } catch (error) {
    noHeatmaps(card, error.message);
    return;
  }
  const buttons = [];
  const items = body.stages.map((stage) => {
    const label = `${stage.node} → ${stage.class} (${percent(stage.probability)})`;
    if (!stage.heatmap_png) return el("span", { class: "note", text: `${label}: ${stage.note}` });
    const button = el("button", { type: "button", "aria-pressed": "false", text: `Heatmap ${label}` });
    button.addEventListener("click", () => {
      const show = button.getAttribute("aria-pressed") !== "true";
      for (const b of buttons) b.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-pressed", String(show));
      card.heat.src = `data:image/png;base64,${stage.heatmap_png}`;
      card.heat.hidden = !show;
    });
    buttons.push(button);
    return button;
  });
  card.stages.replaceChildren(...items);
  card.root.removeAttribute("aria-busy");
}

// --- the model and its class tree -----------------------------------------------------------------
function treeNode(node) {
  if (node.leaf) return el("li", { class: "leaf", text: node.name });
  const accuracy = node.val_accuracy == null ? "no val accuracy" : `val accuracy ${percent(node.val_accuracy)}`;
  const counts = Object.entries(node.class_counts).map(([c, n]) => `${c}: ${n}`).join(", ");
  const meta = node.kind === "constant" ? "constant (one child)" : `${accuracy} on ${node.val_images} images`;
  const summary = el("summary", {}, el("strong", { text: node.name }), " ",
    el("span", { class: "meta", text: `${meta}${counts ? ` · ${counts}` : ""}` }));
  return el("li", {}, el("details", { open: "" }, summary, el("ul", {}, ...node.children.map(treeNode))));
}

// The model's description, or null when it could not be read (then the page still tries to explain).
async function loadModel() {
  try {
    const model = await api("/v1/model");
    $("#model-summary").textContent = `${model.mode} mode, ${model.backbone} at ${model.image_size} px · `
      + `${model.leaves} classes in ${model.depth} levels · ${model.parents} parent nodes`
      + (model.attributes.length ? ` · attributes: ${model.attributes.map((a) => a.name).join(", ")}` : "");
    $("#tree").replaceChildren(el("div", { class: "tree" }, el("ul", {}, treeNode(model.tree))));
    return model;
  } catch (error) {
    $("#model-summary").textContent = error.message;
    return null;
  }
}

let modelLoaded = loadModel();
