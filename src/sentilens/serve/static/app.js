// The sentilens page: sends one post to the server, shows the label, the probability bars and,
// for MLLM runs, the patch-score heatmap (CLS attention, or attention received) with the kept patches outlined.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("model-line").textContent = "this server needs an API key: enter it below";
    $("key-box").open = true;
    return;
  }
  if (!response.ok) {
    $("model-line").textContent = await errorMessage(response);
    return;
  }
  model = await response.json();
  const strategies = model.strategies && model.strategies.length ? `; token pruning: ${model.strategies.join(", ")}` : "";
  $("model-line").textContent = `${model.family} run ${model.run} (${model.base_model}); labels: ${model.labels.join(", ")}${strategies}`;
  $("ratio-row").hidden = !model.supports_keep_ratio;
}

function showBars(probabilities, label) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = name === label ? "bar top" : "bar";
    row.dataset.label = name;
    const title = document.createElement("span");
    title.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p.toFixed(3);
    row.append(title, track, value);
    bars.append(row);
  }
}

// The "jet" colour map (blue -> cyan -> yellow -> red) of the paper's Figure 3, for a score in [0, 1].
function jet(v) {
  const channel = (offset) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - offset))));
  return [channel(3), channel(2), channel(1)];
}

function drawHeatmap(heatmap) {
  const canvas = $("heatmap");
  const picture = new Image();
  picture.onload = () => {
    const context = canvas.getContext("2d");
    const size = canvas.width;
    const cell = size / heatmap.grid;
    context.drawImage(picture, 0, 0, size, size);
    for (let row = 0; row < heatmap.grid; row++) {
      for (let col = 0; col < heatmap.grid; col++) {
        const [r, g, b] = jet(heatmap.scores[row][col]);
        context.fillStyle = `rgba(${r}, ${g}, ${b}, 0.45)`;
        context.fillRect(col * cell, row * cell, cell, cell);
      }
    }
    context.strokeStyle = "#ffffff";
    context.lineWidth = Math.max(1, cell / 12);
    for (let row = 0; row < heatmap.grid; row++) {
      for (let col = 0; col < heatmap.grid; col++) {
        if (heatmap.kept[row][col]) {
          context.strokeRect(col * cell + 1, row * cell + 1, cell - 2, cell - 2);
        }
      }
    }
    // the original image's place in the square the tower saw; outside it, the mean-colour padding
    const [x0, y0, x1, y1] = heatmap.content.map((v) => v * size);
    context.setLineDash([6, 4]);
    context.strokeStyle = "#000000";
    context.lineWidth = 2;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.setLineDash([]);
    const padded = x0 > 0 || y0 > 0 || x1 < size || y1 < size;
    $("heatmap-caption").textContent =
      `${heatmap.score_name} per patch; outlined: the ${heatmap.kept_patches} of ${heatmap.patches} patches kept` +
      (padded ? "; outside the dashed box: padding" : "");
    $("heatmap-figure").hidden = false;
    canvas.dataset.drawn = "true";
  };
  picture.src = heatmap.image;
}

async function classify(event) {
  event.preventDefault();
  showError("");
  const file = $("image").files[0];
  const text = $("text").value;
  const form = new FormData();
  form.append("text", text);
  if (file) form.append("image", file);
  const filtering = model && model.supports_keep_ratio;
  if (filtering) form.append("keep_ratio", $("keep-ratio").value);
  const endpoint = filtering && file ? "/v1/explain" : "/v1/predict";
  $("submit").disabled = true;
  $("heatmap").dataset.drawn = "false";
  $("heatmap-figure").hidden = true;
  try {
    const response = await fetch(endpoint, { method: "POST", body: form, headers: headers() });
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    const result = await response.json();
    $("label").textContent = result.label;
    showBars(result.probabilities, result.label);
    const kept = result.kept_tokens === null ? "" : `, ${result.kept_tokens} visual tokens kept`;
    const ratio = result.keep_ratio === null ? "" : ` at keep ratio ${result.keep_ratio}`;
    $("details").textContent = `${result.model}${ratio}${kept}; ${result.latency_ms.toFixed(0)} ms`;
    $("result").hidden = false;
    if (result.heatmap) drawHeatmap(result.heatmap);
  } catch (err) {
    showError(`request failed: ${err}`);
  } finally {
    $("submit").disabled = false;
  }
}

$("keep-ratio").addEventListener("input", () => {
  $("keep-ratio-value").textContent = Number($("keep-ratio").value).toFixed(2);
});
$("api-key").addEventListener("change", loadModel);
$("post-form").addEventListener("submit", classify);
loadModel();
