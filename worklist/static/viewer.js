// A canvas viewer for one radiograph: window/level (drag, presets, reset, invert), zoom and
// pan (wheel, drag, keys), fit to screen, a sharper rendering fetched when zoomed in, and one
// heatmap overlay at a time with its opacity.
//
// The server sends the values *before* windowing (16-bit, /values), so window/level here is a
// real one: a 65,536-entry lookup table from those values to grey levels, not a brightness
// filter over an 8-bit picture. The default window is the one the model's rendering used.
// The pure parts (windowLut, applyLut, presets, fitScale) are exported on XrayViewer for tests.
(function (global) {
  "use strict";

  const LEVELS = 65535;
  const SIZES = [1024, 2048, 4096];
  const MIN_ZOOM = 0.25;
  const MAX_ZOOM = 16;

  // Grey level (0..255) for every stored 16-bit value: value -> modality units -> window -> grey.
  function windowLut(center, width, invert, low, high) {
    const lut = new Uint8ClampedArray(LEVELS + 1);
    const w = Math.max(width, 1e-6);
    const lower = center - w / 2;
    const step = (high - low) / LEVELS;
    for (let v = 0; v <= LEVELS; v++) {
      let y = (low + v * step - lower) / w;
      y = y < 0 ? 0 : y > 1 ? 1 : y;
      lut[v] = Math.round((invert ? 1 - y : y) * 255);
    }
    return lut;
  }

  function applyLut(values, lut, rgba) {
    for (let i = 0, j = 0; i < values.length; i++, j += 4) {
      const g = lut[values[i]];
      rgba[j] = g; rgba[j + 1] = g; rgba[j + 2] = g; rgba[j + 3] = 255;
    }
    return rgba;
  }

  // Radiographs carry no calibrated units (no Hounsfield scale), so presets are relative to the
  // image: the model's window, the whole range, and a narrower and a wider one around its centre.
  function presets(meta) {
    return [
      { key: "1", name: "Default (as the model sees it)", center: meta.center, width: meta.width },
      { key: "2", name: "Full range", center: (meta.low + meta.high) / 2, width: meta.high - meta.low },
      { key: "3", name: "Narrow: more contrast", center: meta.center, width: meta.width * 0.6 },
      { key: "4", name: "Wide: less contrast", center: meta.center, width: meta.width * 1.6 },
    ];
  }

  function fitScale(viewW, viewH, imageW, imageH) {
    return Math.min(viewW / imageW, viewH / imageH);
  }

  function headerNumber(response, name) {
    const value = Number(response.headers.get(name));
    if (!Number.isFinite(value)) throw new Error("missing " + name);
    return value;
  }

  async function fetchValues(url, size) {
    const response = await fetch(url + "?size=" + size, { credentials: "same-origin" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const buffer = await response.arrayBuffer();
    const meta = {
      rows: headerNumber(response, "X-Viewer-Rows"),
      cols: headerNumber(response, "X-Viewer-Columns"),
      fullRows: headerNumber(response, "X-Viewer-Full-Rows"),
      fullCols: headerNumber(response, "X-Viewer-Full-Columns"),
      low: headerNumber(response, "X-Viewer-Low"),
      high: headerNumber(response, "X-Viewer-High"),
      center: headerNumber(response, "X-Viewer-Window-Center"),
      width: headerNumber(response, "X-Viewer-Window-Width"),
      invert: response.headers.get("X-Viewer-Invert") === "1",
      windowSource: response.headers.get("X-Viewer-Window-Source") || "",
      size: size,
    };
    if (buffer.byteLength !== meta.rows * meta.cols * 2) throw new Error("truncated image data");
    return { meta: meta, values: new Uint16Array(buffer) };
  }

  class XrayViewer {
    constructor(root) {
      this.root = root;
      this.canvas = root.querySelector("canvas.view");
      this.readout = root.querySelector(".readout");
      this.url = root.dataset.values;
      this.heat = null; // the heatmap image drawn over the radiograph, or null
      this.opacity = 0.5;
      this.zoom = 1; // relative to fit-to-screen
      this.panX = 0; this.panY = 0; // canvas pixels
      this.tool = "window";
      this.loading = false;
      this.image = null; // offscreen canvas with the windowed radiograph
    }

    async start() {
      try {
        const first = await fetchValues(this.url, SIZES[0]);
        this.meta = first.meta; this.values = first.values;
        this.center = this.meta.center; this.width = this.meta.width; this.invert = this.meta.invert;
        this.baseInvert = this.meta.invert;
        this.bind();
        this.resize();
        this.rewindow();
        this.root.dataset.state = "ready";
      } catch (err) {
        this.root.dataset.state = "error";
        this.root.querySelector(".viewer-error").textContent = "The image could not be shown (" + err.message + ").";
      }
    }

    // ----------------------------------------------------------------- drawing
    resize() {
      const ratio = global.devicePixelRatio || 1;
      const box = this.canvas.getBoundingClientRect();
      this.canvas.width = Math.max(1, Math.round(box.width * ratio));
      this.canvas.height = Math.max(1, Math.round(box.height * ratio));
      this.draw();
    }

    rewindow() {
      const m = this.meta;
      const lut = windowLut(this.center, this.width, this.invert, m.low, m.high);
      if (!this.image || this.image.width !== m.cols || this.image.height !== m.rows) {
        this.image = document.createElement("canvas");
        this.image.width = m.cols; this.image.height = m.rows;
      }
      const ctx = this.image.getContext("2d");
      const data = ctx.createImageData(m.cols, m.rows);
      applyLut(this.values, lut, data.data);
      ctx.putImageData(data, 0, 0);
      this.draw();
    }

    // Where the image lies on the canvas: full-resolution geometry, whatever size is loaded.
    placement() {
      const m = this.meta;
      const scale = fitScale(this.canvas.width, this.canvas.height, m.fullCols, m.fullRows) * this.zoom;
      const w = m.fullCols * scale, h = m.fullRows * scale;
      return { x: (this.canvas.width - w) / 2 + this.panX, y: (this.canvas.height - h) / 2 + this.panY, w: w, h: h, scale: scale };
    }

    draw() {
      if (!this.image) return;
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
      const p = this.placement();
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(this.image, p.x, p.y, p.w, p.h);
      if (this.heat && this.heat.complete && this.heat.naturalWidth > 0 && this.opacity > 0) {
        ctx.globalAlpha = this.opacity;
        ctx.drawImage(this.heat, p.x, p.y, p.w, p.h);
        ctx.globalAlpha = 1;
      }
      this.report(p);
      this.sharpen(p);
    }

    report(p) {
      const d = this.root.dataset;
      d.center = String(this.center); d.width = String(this.width); d.zoom = String(this.zoom);
      d.panX = String(this.panX); d.panY = String(this.panY);
      d.invert = this.invert !== this.baseInvert ? "1" : "0";
      d.loadedSize = String(this.meta.size);
      d.loadedColumns = String(this.meta.cols);
      if (this.readout) {
        const shown = Math.round(p.scale * 100);
        this.readout.textContent = "W " + this.width.toFixed(0) + "  L " + this.center.toFixed(0) +
          (this.invert !== this.baseInvert ? "  inverted" : "") + "  ·  zoom " + shown + "% of full size" +
          "  ·  " + this.meta.cols + "×" + this.meta.rows + " of " + this.meta.fullCols + "×" + this.meta.fullRows + " px";
      }
    }

    // Zoomed past the loaded rendering's pixels: fetch a larger one (up to full resolution).
    async sharpen(p) {
      const m = this.meta;
      if (this.loading || m.cols >= m.fullCols || p.w <= m.cols * 1.05) return;
      const next = SIZES.find((s) => s > m.size);
      if (!next) return;
      this.loading = true;
      try {
        const got = await fetchValues(this.url, next);
        this.meta = Object.assign(got.meta, { center: m.center, width: m.width });
        this.values = got.values;
        this.rewindow();
      } catch (err) {
        // Keep the smaller rendering; the readout says what is shown.
      } finally {
        this.loading = false;
      }
    }

    // ----------------------------------------------------------------- actions
    setWindow(center, width) {
      this.center = center;
      this.width = Math.max(width, (this.meta.high - this.meta.low) / 4096);
      this.rewindow();
    }

    preset(key) {
      const found = presets({ center: this.meta.center, width: this.meta.width, low: this.meta.low, high: this.meta.high })
        .find((p) => p.key === String(key));
      if (found) this.setWindow(found.center, found.width);
    }

    toggleInvert() { this.invert = !this.invert; this.rewindow(); }

    fit() { this.zoom = 1; this.panX = 0; this.panY = 0; this.draw(); }

    reset() {
      this.invert = this.baseInvert;
      this.center = this.meta.center; this.width = this.meta.width;
      this.zoom = 1; this.panX = 0; this.panY = 0;
      this.rewindow();
    }

    // Zoom by `factor` keeping the canvas point (cx, cy) where it is.
    zoomBy(factor, cx, cy) {
      const before = this.placement();
      const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
      if (cx === undefined) { cx = this.canvas.width / 2; cy = this.canvas.height / 2; }
      const fx = (cx - before.x) / before.w, fy = (cy - before.y) / before.h;
      this.zoom = zoom;
      const after = this.placement();
      this.panX += cx - (after.x + fx * after.w);
      this.panY += cy - (after.y + fy * after.h);
      this.draw();
    }

    panBy(dx, dy) { this.panX += dx; this.panY += dy; this.draw(); }

    showHeatmap(url) {
      if (!url) { this.heat = null; this.draw(); return; }
      const img = new Image();
      img.onload = () => { if (this.heat === img) this.draw(); };
      img.src = url;
      this.heat = img;
      this.draw();
    }

    setOpacity(value) { this.opacity = value; this.draw(); }

    setTool(tool) {
      this.tool = tool;
      this.root.querySelectorAll("[data-tool]").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.tool === tool)));
    }

    // ----------------------------------------------------------------- input
    bind() {
      const c = this.canvas;
      const ratio = () => global.devicePixelRatio || 1;
      let drag = null;
      c.addEventListener("contextmenu", (e) => e.preventDefault());
      c.addEventListener("pointerdown", (e) => {
        c.setPointerCapture(e.pointerId);
        const mode = e.button === 2 || e.button === 1 || e.shiftKey ? "pan" : e.ctrlKey ? "zoom" : this.tool;
        drag = { x: e.clientX, y: e.clientY, mode: mode, center: this.center, width: this.width };
        c.focus();
      });
      c.addEventListener("pointermove", (e) => {
        if (!drag) return;
        const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
        if (drag.mode === "window") {
          // Right widens the window, down raises the level: the usual PACS convention.
          const unit = (this.meta.high - this.meta.low) / 1000;
          this.setWindow(drag.center + dy * unit, drag.width * Math.exp(dx / 200));
        } else if (drag.mode === "zoom") {
          this.zoomBy(Math.exp(-(e.movementY || 0) / 100));
        } else {
          this.panBy((e.clientX - drag.x) * ratio(), (e.clientY - drag.y) * ratio());
          drag.x = e.clientX; drag.y = e.clientY;
        }
      });
      const end = () => { drag = null; };
      c.addEventListener("pointerup", end);
      c.addEventListener("pointercancel", end);
      c.addEventListener("wheel", (e) => {
        e.preventDefault();
        const box = c.getBoundingClientRect();
        this.zoomBy(Math.exp(-e.deltaY / 500), (e.clientX - box.left) * ratio(), (e.clientY - box.top) * ratio());
      }, { passive: false });
      c.addEventListener("dblclick", () => this.fit());
      global.addEventListener("resize", () => this.resize());
      this.root.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => this.setTool(b.dataset.tool)));
      this.root.querySelectorAll("[data-preset]").forEach((b) => b.addEventListener("click", () => this.preset(b.dataset.preset)));
      const on = (sel, fn) => { const el = this.root.querySelector(sel); if (el) el.addEventListener("click", fn); };
      on(".act-fit", () => this.fit());
      on(".act-reset", () => this.reset());
      on(".act-invert", () => this.toggleInvert());
      on(".act-zoom-in", () => this.zoomBy(1.25));
      on(".act-zoom-out", () => this.zoomBy(0.8));
    }

    // Keys, for the page to route to the viewer under the pointer (or the first one).
    key(e) {
      const step = 40 * (global.devicePixelRatio || 1);
      switch (e.key) {
        case "+": case "=": this.zoomBy(1.25); return true;
        case "-": case "_": this.zoomBy(0.8); return true;
        case "f": this.fit(); return true;
        case "r": this.reset(); return true;
        case "i": this.toggleInvert(); return true;
        case "w": this.setTool("window"); return true;
        case "g": this.setTool("pan"); return true;
        case "1": case "2": case "3": case "4": this.preset(e.key); return true;
        case "ArrowLeft": this.panBy(step, 0); return true;
        case "ArrowRight": this.panBy(-step, 0); return true;
        case "ArrowUp": this.panBy(0, step); return true;
        case "ArrowDown": this.panBy(0, -step); return true;
        default: return false;
      }
    }
  }

  XrayViewer.windowLut = windowLut;
  XrayViewer.applyLut = applyLut;
  XrayViewer.presets = presets;
  XrayViewer.fitScale = fitScale;
  global.XrayViewer = XrayViewer;
})(window);
