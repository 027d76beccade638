// The lmlab playground: plain JavaScript against the server's own API (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
const setups = [
  {temperature: 0, top_k: 0, top_p: 1},
  {temperature: 0.8, top_k: 20, top_p: 0.95},
];

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, {method: body ? "POST" : "GET", headers: headers(),
                               body: body ? JSON.stringify(body) : undefined});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

// ------------------------------------------------------------ model info

async function loadInfo() {
  try {
    info = await api("/v1/info");
  } catch (e) {
    $("model-info").textContent = "cannot reach the server: " + e.message;
    return;
  }
  $("model-info").textContent = `${info.model} · ${info.family} · vocabulary ${info.vocab_size}` +
    (info.context ? ` · context ${info.context}` : "") + ` · ${info.policy}`;
  $("top-k").max = Math.min(info.vocab_size, 50);
  if (info.layers) {
    $("attention-section").hidden = false;
    for (let i = 0; i < info.layers; i++) $("layer").add(new Option(String(i), String(i)));
    for (let i = 0; i < info.heads; i++) $("head").add(new Option(String(i), String(i)));
  }
  refreshChart();
}

// ------------------------------------------------------------ setups side by side

function setupBody(s) {
  const body = {temperature: s.temperature};
  if (s.top_k > 0) body.top_k = s.top_k;
  if (s.top_p < 1 && s.temperature > 0) body.top_p = s.top_p;
  return body;
}

function describe(s) {
  if (s.temperature === 0) return "greedy";
  const parts = [`temperature ${s.temperature}`];
  if (s.top_k > 0) parts.push(`top-k ${s.top_k}`);
  if (s.top_p < 1) parts.push(`top-p ${s.top_p}`);
  return parts.join(", ");
}

function renderColumns() {
  const columns = $("columns");
  columns.innerHTML = "";
  setups.forEach((s, i) => {
    const col = document.createElement("div");
    col.className = "column";
    col.dataset.index = i;
    col.innerHTML = `<div class="setup">
        <label>temperature <input type="number" step="0.1" min="0" data-field="temperature" value="${s.temperature}"></label>
        <label>top-k <input type="number" step="1" min="0" data-field="top_k" value="${s.top_k}"></label>
        <label>top-p <input type="number" step="0.05" min="0" max="1" data-field="top_p" value="${s.top_p}"></label>
      </div>
      <div class="name">${describe(s)}</div>
      <div class="output"></div><div class="finish"></div>`;
    col.querySelectorAll("input").forEach((input) => input.addEventListener("change", () => {
      s[input.dataset.field] = Number(input.value);
      col.querySelector(".name").textContent = describe(s);
    }));
    columns.appendChild(col);
  });
}

function probColour(p) {
  return `hsl(${Math.round(120 * p)}, 75%, 82%)`;
}

function tokenSpan(text, logprob, processed, alternatives) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  const p = Math.exp(logprob);
  span.style.background = probColour(p);
  span.dataset.prob = p.toFixed(4);
  span.dataset.processed = processed === null ? "" : Math.exp(processed).toFixed(4);
  span.dataset.alternatives = JSON.stringify(alternatives || []);
  return span;
}

async function streamCompletion(body, onChoice) {
  const r = await fetch("/v1/completions", {method: "POST", headers: headers(),
                                            body: JSON.stringify({...body, stream: true})});
  if (!r.ok) {
    const data = await r.json();
    throw new Error(data.error ? data.error.message : r.statusText);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const payload = line.slice(6);
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(chunk.error.message);
      chunk.choices.forEach(onChoice);
    }
  }
}

async function generateAll() {
  $("status").textContent = "";
  const prompt = $("prompt").value;
  const common = {prompt, max_tokens: Number($("max-tokens").value), seed: Number($("seed").value), logprobs: 5};
  $("generate").disabled = true;
  const runs = [...document.querySelectorAll(".column")].map(async (col) => {
    const s = setups[Number(col.dataset.index)];
    const out = col.querySelector(".output");
    out.innerHTML = "";
    const shown = document.createElement("span");
    shown.className = "prompt-text";
    shown.textContent = prompt;
    out.appendChild(shown);
    col.querySelector(".finish").textContent = "";
    try {
      await streamCompletion({...common, ...setupBody(s)}, (choice) => {
        const lp = choice.logprobs;
        if (lp) {  // a chunk may carry several tokens when they arrive faster than they are sent
          lp.tokens.forEach((token, k) => out.appendChild(
            tokenSpan(token, lp.token_logprobs[k], lp.processed_logprobs[k], lp.alternatives[k])));
        }
        if (choice.finish_reason) col.querySelector(".finish").textContent = "finish: " + choice.finish_reason;
      });
    } catch (e) {
      col.querySelector(".finish").textContent = "error: " + e.message;
    }
  });
  await Promise.all(runs);
  $("generate").disabled = false;
}

function showTooltip(event) {
  const span = event.target.closest(".token");
  const tip = $("tooltip");
  if (!span) { tip.hidden = true; return; }
  const alts = JSON.parse(span.dataset.alternatives);
  const pct = (lp) => lp === null ? "cut" : (100 * Math.exp(lp)).toFixed(1) + "%";
  const rows = alts.map((a) => `<tr><td>${escapeHtml(JSON.stringify(a.token))}</td><td>${pct(a.logprob)}</td>` +
                               `<td>${pct(a.processed_logprob)}</td></tr>`).join("");
  tip.innerHTML = `<div>${escapeHtml(JSON.stringify(span.textContent))}: p = ${span.dataset.prob}` +
    (span.dataset.processed ? `, after processors ${span.dataset.processed}` : "") + `</div>` +
    `<table><tr><th>token</th><th>model</th><th>processed</th></tr>${rows}</table>`;
  tip.style.left = (event.clientX + 12) + "px";
  tip.style.top = (event.clientY + 12) + "px";
  tip.hidden = false;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

// ------------------------------------------------------------ the next-token bar chart

let chartTimer = null;
let chartRequest = 0;

function sliderValues() {
  const temperature = Number($("temperature").value);
  const top_k = Number($("top-k").value);
  const top_p = Number($("top-p").value);
  $("temperature-value").textContent = temperature;
  $("top-k-value").textContent = top_k > 0 ? top_k : "off";
  $("top-p-value").textContent = top_p;
  const body = {temperature};
  if (top_k > 0) body.top_k = top_k;
  if (top_p < 1) body.top_p = top_p;
  return body;
}

function refreshChart() {
  clearTimeout(chartTimer);
  chartTimer = setTimeout(drawChart, 80);
}

async function drawChart() {
  const processors = sliderValues();
  const id = ++chartRequest;
  let data;
  try {
    data = await api("/v1/next-token", {prompt: $("prompt").value, top_n: 20, ...processors});
  } catch (e) {
    $("entropy").textContent = "error: " + e.message;
    return;
  }
  if (id !== chartRequest) return;  // a newer request is on its way
  $("entropy").textContent = `entropy ${data.entropy.toFixed(3)} nats → ${data.processed_entropy.toFixed(3)} ` +
    `after the processors; ${data.kept} token(s) kept of ${info ? info.vocab_size : "?"}`;
  const svg = $("chart");
  const W = 900, H = 260, pad = 30, n = data.tokens.length;
  const bw = (W - 2 * pad) / n;
  const top = Math.max(...data.tokens.map((t) => Math.max(t.prob, t.processed_prob)), 1e-9);
  const y = (p) => H - pad - (H - 2 * pad) * p / top;
  const parts = [];
  data.tokens.forEach((t, i) => {
    const x = pad + i * bw;
    parts.push(`<g class="bar" data-index="${i}" data-id="${t.id}">` +
      `<rect class="model-bar" x="${x + 1}" y="${y(t.prob)}" width="${bw - 2}" height="${H - pad - y(t.prob)}" fill="#bbb"></rect>` +
      `<rect class="processed-bar" x="${x + bw * 0.25}" y="${y(t.processed_prob)}" width="${bw * 0.5}" ` +
      `height="${H - pad - y(t.processed_prob)}" fill="#2a6fd6"></rect>` +
      `<text x="${x + bw / 2}" y="${H - pad + 14}" font-size="11" text-anchor="middle">${escapeHtml(JSON.stringify(t.text))}</text>` +
      `<title>${escapeHtml(JSON.stringify(t.text))}: ${(100 * t.prob).toFixed(2)}% → ${(100 * t.processed_prob).toFixed(2)}%</title></g>`);
  });
  const line = (index, label, colour) => {
    if (index <= 0 || index >= n) return;
    const x = pad + index * bw;
    parts.push(`<line class="cutoff" x1="${x}" x2="${x}" y1="${pad - 10}" y2="${H - pad}" stroke="${colour}" ` +
               `stroke-dasharray="4 3"></line><text x="${x + 3}" y="${pad - 12}" font-size="11" fill="${colour}">${label}</text>`);
  };
  if (processors.top_k) line(processors.top_k, "top-k", "#c60");
  if (processors.top_p) line(data.tokens.filter((t) => t.processed_logprob !== null).length, "top-p", "#a0a");
  svg.innerHTML = parts.join("");
  svg.querySelectorAll(".bar").forEach((g) => g.addEventListener("click", () => {
    $("prompt").value += data.tokens[Number(g.dataset.index)].text;
    refreshChart();
  }));
}

// ------------------------------------------------------------ attention

async function showAttention() {
  let data;
  try {
    data = await api("/v1/attention", {prompt: $("prompt").value, layer: Number($("layer").value)});
  } catch (e) {
    $("heatmap").textContent = "error: " + e.message;
    return;
  }
  const w = data.weights[Number($("head").value)];
  const label = (t) => escapeHtml(JSON.stringify(t).slice(1, -1));
  let html = "<table><tr><th></th>" + data.tokens.map((t) => `<th>${label(t)}</th>`).join("") + "</tr>";
  w.forEach((row, i) => {
    html += `<tr><th>${label(data.tokens[i])}</th>` + row.map((v) =>
      `<td class="cell" title="${v.toFixed(3)}" style="background: rgba(42, 111, 214, ${v.toFixed(3)})"></td>`).join("") + "</tr>";
  });
  $("heatmap").innerHTML = html + "</table>";
}

// ------------------------------------------------------------ wiring

$("generate").addEventListener("click", generateAll);
$("add-setup").addEventListener("click", () => {
  if (setups.length < 4) { setups.push({temperature: 1, top_k: 0, top_p: 1}); renderColumns(); }
});
$("remove-setup").addEventListener("click", () => {
  if (setups.length > 2) { setups.pop(); renderColumns(); }
});
$("columns").addEventListener("mousemove", showTooltip);
$("columns").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
["temperature", "top-k", "top-p"].forEach((id) => $(id).addEventListener("input", refreshChart));
$("prompt").addEventListener("input", refreshChart);
$("show-attention").addEventListener("click", showAttention);
$("api-key").value = localStorage.getItem("lmlab-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("lmlab-api-key", $("api-key").value); loadInfo(); });
renderColumns();
loadInfo();
