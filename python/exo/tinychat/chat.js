// exo web chat: streams completions from the node's ChatGPT-compatible API, shows the cluster and downloads.
"use strict";

(() => {
  const STORAGE_KEY = "exo-chat-v1";
  const api = window.location.origin;

  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"),
    empty: $("empty"),
    error: $("error"),
    form: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    stats: $("stats"),
    model: $("model-select"),
    newChat: $("new-chat"),
    nodes: $("nodes"),
    nodeCount: $("node-count"),
    ring: $("ring"),
    downloads: $("downloads"),
    downloadsSection: $("downloads-section"),
    attach: $("attach"),
    imageFile: $("image-file"),
    attachment: $("attachment"),
    attachmentPreview: $("attachment-preview"),
    removeImage: $("remove-image"),
  };

  // ---------------------------------------------------------------- state kept across reloads

  function loadState() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
      if (saved && Array.isArray(saved.messages)) return saved;
    } catch (e) {
      console.warn("discarding unreadable saved chat", e);
    }
    return { model: null, messages: [] };
  }

  const state = loadState();
  let controller = null;
  // The image attached to the next message, as a data URL (sent as an `image_url` part).
  let pendingImage = null;

  function save() {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
    } catch (e) {
      console.warn("the chat is too large to keep across reloads", e);
    }
  }

  // ---------------------------------------------------------------- the API, with its key when it has one

  // A node started with --api-key answers 401 without the key: ask for it once and keep it in this browser.
  const KEY_STORAGE = "exo-api-key";
  let keyDeclined = false;

  async function apiFetch(path, init = {}) {
    const sent = localStorage.getItem(KEY_STORAGE);
    const withKey = (key) => {
      const headers = { ...(init.headers || {}) };
      if (key) headers.Authorization = `Bearer ${key}`;
      return fetch(`${api}${path}`, { ...init, headers });
    };
    const response = await withKey(sent);
    if (response.status !== 401) return response;
    // Another request may have asked already; only ask when the key this one sent is still the stored one.
    if (localStorage.getItem(KEY_STORAGE) === sent) {
      if (keyDeclined) return response;
      const entered = window.prompt("This node asks for its API key (--api-key):");
      if (!entered) {
        keyDeclined = true;
        return response;
      }
      localStorage.setItem(KEY_STORAGE, entered.trim());
    }
    return withKey(localStorage.getItem(KEY_STORAGE));
  }

  // ---------------------------------------------------------------- helpers

  function formatBytes(n) {
    if (!Number.isFinite(n) || n <= 0) return "0 B";
    const units = ["B", "KB", "MB", "GB", "TB"];
    const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
    return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function formatSeconds(s) {
    if (!Number.isFinite(s) || s < 0) return "";
    if (s < 60) return `${Math.round(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  // ---------------------------------------------------------------- conversation view

  // A message's content is its text, or a list of text and image parts.
  function contentText(content) {
    if (!Array.isArray(content)) return content;
    return content.filter((p) => p.type === "text").map((p) => p.text).join("");
  }

  function contentImages(content) {
    return Array.isArray(content) ? content.filter((p) => p.type === "image_url").map((p) => p.image_url.url) : [];
  }

  function renderMessage(message) {
    const box = el("div", `message ${message.role}`);
    box.append(el("div", "who", message.role === "user" ? "You" : "exo"));
    const body = el("div", "body", contentText(message.content));
    box.append(body);
    for (const url of contentImages(message.content)) {
      const image = el("img", "image");
      image.src = url;
      image.alt = "Attached image";
      box.append(image);
    }
    const meta = el("div", "meta", message.meta || "");
    box.append(meta);
    els.messages.append(box);
    return { box, body, meta };
  }

  function renderAll() {
    els.messages.querySelectorAll(".message").forEach((m) => m.remove());
    els.empty.hidden = state.messages.length > 0;
    state.messages.forEach(renderMessage);
    scrollDown();
  }

  function scrollDown() {
    els.messages.scrollTop = els.messages.scrollHeight;
  }

  function setBusy(busy) {
    els.send.hidden = busy;
    els.stop.hidden = !busy;
    els.prompt.disabled = busy;
    if (!busy) els.prompt.focus();
  }

  function autosize() {
    els.prompt.style.height = "auto";
    els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 192)}px`;
  }

  // ---------------------------------------------------------------- streaming a completion

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
      return JSON.stringify(body);
    } catch (e) {
      return `${response.status} ${response.statusText}`;
    }
  }

  // Yields the payload of each `data:` line of a Server-Sent Events body.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) yield line.slice(5).trim();
        }
      }
    }
  }

  function setPendingImage(url) {
    pendingImage = url;
    els.attachment.hidden = !url;
    if (url) els.attachmentPreview.src = url;
    else els.attachmentPreview.removeAttribute("src");
  }

  async function send(text) {
    showError("");
    const content = pendingImage
      ? [{ type: "text", text }, { type: "image_url", image_url: { url: pendingImage } }]
      : text;
    setPendingImage(null);
    const user = { role: "user", content };
    state.messages.push(user);
    els.empty.hidden = true;
    renderMessage(user);
    const reply = { role: "assistant", content: "" };
    const view = renderMessage(reply);
    view.box.classList.add("streaming");
    scrollDown();
    save();

    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    let firstTokenAt = null;
    let pieces = 0;
    let usage = null;
    let finish = null;
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          model: state.model || undefined,
          messages: state.messages.filter((m) => m !== reply).map(({ role, content }) => ({ role, content })),
          stream: true,
          stream_options: { include_usage: true },
        }),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const data of sseEvents(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the request failed");
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstTokenAt === null) firstTokenAt = performance.now();
          pieces += 1;
          reply.content += piece;
          view.body.textContent = reply.content;
          const seconds = (performance.now() - firstTokenAt) / 1000;
          els.stats.textContent = `generating · ${pieces} pieces${seconds > 0 ? ` · ${(pieces / seconds).toFixed(1)}/s` : ""}`;
          scrollDown();
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") showError(e.message);
    } finally {
      controller = null;
      view.box.classList.remove("streaming");
      const tokens = usage ? usage.completion_tokens : pieces;
      const elapsed = firstTokenAt === null ? 0 : (performance.now() - firstTokenAt) / 1000;
      const parts = [];
      if (firstTokenAt !== null) parts.push(`first token ${((firstTokenAt - started) / 1000).toFixed(2)}s`);
      if (elapsed > 0) parts.push(`${(tokens / elapsed).toFixed(1)} tokens/s`);
      parts.push(`${tokens} tokens`);
      if (finish) parts.push(finish === "length" ? "stopped at the token limit" : "done");
      reply.meta = parts.join(" · ");
      view.meta.textContent = reply.meta;
      els.stats.textContent = "";
      if (reply.content) state.messages.push(reply);
      else view.box.remove();
      save();
      setBusy(false);
    }
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    try {
      const response = await apiFetch("/v1/models");
      if (!response.ok) throw new Error(await errorText(response));
      const { data } = await response.json();
      els.model.replaceChildren();
      for (const model of data) {
        const option = el("option", "", model.name || model.id);
        option.value = model.id;
        option.dataset.name = model.name || model.id;
        option.dataset.vision = String(Boolean(model.vision));
        els.model.append(option);
      }
      if (state.model && data.some((m) => m.id === state.model)) els.model.value = state.model;
      else if (data.length) state.model = data[0].id;
      save();
      fitAttachToModel();
      refreshModelPool();
    } catch (e) {
      showError(`Could not list models: ${e.message}`);
    }
  }

  // Only a vision model (`vision` in /v1/models) takes images: the Image button shows for it alone, and an image
  // attached for one is dropped on switching to a model without.
  function fitAttachToModel() {
    const option = els.model.selectedOptions[0];
    const vision = Boolean(option) && option.dataset.vision === "true";
    els.attach.hidden = !vision;
    if (!vision) setPendingImage(null);
  }

  async function refreshModelPool() {
    try {
      const response = await apiFetch("/modelpool");
      if (!response.ok) return;
      for await (const data of sseEvents(response)) {
        if (data === "[DONE]") break;
        const entry = JSON.parse(data);
        for (const [id, info] of Object.entries(entry)) {
          const option = [...els.model.options].find((o) => o.value === id);
          if (!option || !info) continue;
          const suffix = info.downloaded ? "downloaded" : `${Math.round(info.download_percentage || 0)}%`;
          option.textContent = `${option.dataset.name} (${suffix})`;
        }
      }
    } catch (e) {
      console.warn("model pool", e);
    }
  }

  // ---------------------------------------------------------------- cluster and downloads

  function renderRing(ids) {
    const w = 300, h = 240, cx = w / 2, cy = h / 2, rx = 105, ry = 80;
    const points = ids.map((_, i) => {
      if (ids.length === 1) return [cx, cy];
      const a = -Math.PI / 2 + (2 * Math.PI * i) / ids.length;
      return [cx + rx * Math.cos(a), cy + ry * Math.sin(a)];
    });
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    if (points.length > 1) {
      const ring = document.createElementNS(ns, "polygon");
      ring.setAttribute("points", points.map((p) => p.join(",")).join(" "));
      ring.setAttribute("fill", "none");
      ring.setAttribute("stroke", "#4a5263");
      ring.setAttribute("stroke-dasharray", "4 4");
      svg.append(ring);
    }
    points.forEach(([x, y], i) => {
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x);
      dot.setAttribute("cy", y);
      dot.setAttribute("r", 12);
      dot.setAttribute("fill", i === 0 ? "#f4c430" : "#5b8def");
      svg.append(dot);
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", x);
      label.setAttribute("y", y + 4);
      label.setAttribute("text-anchor", "middle");
      label.setAttribute("font-size", "11");
      label.setAttribute("fill", "#15171c");
      label.textContent = String(i + 1);
      svg.append(label);
    });
    els.ring.replaceChildren(svg);
  }

  async function refreshTopology() {
    try {
      const response = await apiFetch("/topology");
      if (!response.ok) return;
      const topology = await response.json();
      const nodes = Object.entries(topology.nodes || {});
      els.nodeCount.textContent = String(nodes.length);
      renderRing(nodes.map(([id]) => id));
      els.nodes.replaceChildren(
        ...nodes.map(([id, caps], i) => {
          const item = el("li", topology.active_node_id === id ? "self" : "");
          item.append(el("span", "name", `${i + 1}. ${caps.model || "unknown device"}`));
          const gb = caps.memory ? (caps.memory / 1024).toFixed(1) : "?";
          const flops = caps.flops ? caps.flops.fp16.toFixed(2) : "?";
          item.append(el("span", "detail", `${caps.chip || ""} · ${gb} GB · ${flops} TFLOPS fp16`));
          item.title = id;
          return item;
        }),
      );
    } catch (e) {
      console.warn("topology", e);
    }
  }

  async function refreshDownloads() {
    try {
      const response = await apiFetch("/v1/download/progress");
      if (!response.ok) return;
      const progress = Object.entries(await response.json());
      els.downloadsSection.hidden = progress.length === 0;
      els.downloads.replaceChildren(
        ...progress.map(([nodeId, p]) => {
          const item = el("li");
          const fraction = p.total_bytes ? p.downloaded_bytes / p.total_bytes : 0;
          item.append(el("span", "name", p.repo_id || "model"));
          const speed = p.overall_speed ? ` · ${formatBytes(p.overall_speed)}/s` : "";
          const eta = p.overall_eta ? ` · ${formatSeconds(p.overall_eta)} left` : "";
          const detail = `${formatBytes(p.downloaded_bytes)} / ${formatBytes(p.total_bytes)}${speed}${eta}`;
          item.append(el("div", "detail", `${nodeId.slice(0, 8)} · ${detail}`));
          const bar = el("div", "progress");
          const fill = el("div");
          fill.style.width = `${(100 * fraction).toFixed(1)}%`;
          bar.append(fill);
          item.append(bar);
          return item;
        }),
      );
    } catch (e) {
      console.warn("downloads", e);
    }
  }

  // ---------------------------------------------------------------- wiring

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || controller) return;
    els.prompt.value = "";
    autosize();
    send(text);
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });
  els.prompt.addEventListener("input", autosize);
  els.attach.addEventListener("click", () => els.imageFile.click());
  els.imageFile.addEventListener("change", () => {
    const file = els.imageFile.files && els.imageFile.files[0];
    els.imageFile.value = "";
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => setPendingImage(reader.result);
    reader.onerror = () => showError(`cannot read ${file.name}`);
    reader.readAsDataURL(file);
  });
  els.removeImage.addEventListener("click", () => setPendingImage(null));
  els.stop.addEventListener("click", () => controller && controller.abort());
  els.newChat.addEventListener("click", () => {
    if (controller) controller.abort();
    state.messages = [];
    els.stats.textContent = "";
    showError("");
    save();
    renderAll();
  });
  els.model.addEventListener("change", () => {
    state.model = els.model.value;
    save();
    fitAttachToModel();
  });

  renderAll();
  loadModels();
  refreshTopology();
  refreshDownloads();
  setInterval(refreshTopology, 5000);
  setInterval(refreshDownloads, 2000);
  setInterval(refreshModelPool, 30000);
  els.prompt.focus();
})();
