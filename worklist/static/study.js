// The study page: one XrayViewer per image, its heatmap choice (one at a time), opacity,
// legend and score bar, and the keys a radiologist reads with: n / p next and previous study
// on the worklist they came from, m mark read and go on, and the viewer's own keys.
(function () {
  "use strict";
  const viewers = [];
  let hovered = null;

  document.querySelectorAll(".xray-viewer").forEach((root) => {
    const viewer = new window.XrayViewer(root);
    viewers.push(viewer);
    root.addEventListener("pointerenter", () => { hovered = viewer; });
    viewer.start().then(() => wireHeatmaps(root, viewer));
  });

  // The analyse page shows a rendered picture, not values: the heatmap is an <img> over it.
  document.querySelectorAll(".image-stack").forEach((root) => {
    const layer = root.querySelector("img.heatmap");
    if (!layer) return;
    wireHeatmaps(root, {
      showHeatmap: (url) => { layer.classList.toggle("hidden", !url); if (url) layer.src = url; },
      setOpacity: (value) => { layer.style.opacity = String(value); },
    });
  });

  function wireHeatmaps(root, viewer) {
    const legend = root.querySelector(".heat-legend");
    const radios = Array.from(root.querySelectorAll('.heatmap-choice input[type="radio"]'));
    if (!radios.length) return;
    const place = (el, value) => { el.style.left = (Math.max(0, Math.min(1, value)) * 100).toFixed(1) + "%"; };

    function choose() {
      const picked = radios.find((r) => r.checked);
      const finding = picked ? picked.value : "";
      root.dataset.heatmap = finding;
      viewer.showHeatmap(finding ? picked.dataset.url : null);
      legend.hidden = !finding;
      legend.querySelectorAll(".heat-note").forEach((p) => { p.hidden = p.dataset.finding !== finding; });
      if (!finding) return;
      const score = Number(picked.dataset.score), threshold = Number(picked.dataset.threshold);
      const bar = legend.querySelector(".scorebar");
      bar.hidden = !(picked.dataset.score && picked.dataset.threshold);
      if (!bar.hidden) {
        place(bar.querySelector(".thr"), threshold);
        place(bar.querySelector(".val"), score);
        bar.querySelector(".label").textContent = "score " + score.toFixed(2) + " · threshold " + threshold.toFixed(2);
      }
    }

    radios.forEach((r) => r.addEventListener("change", choose));
    const below = root.querySelector(".show-below");
    if (below) {
      below.addEventListener("change", () => {
        root.querySelectorAll(".heat-option.below").forEach((label) => {
          label.hidden = !below.checked;
          const input = label.querySelector("input");
          if (!below.checked && input.checked) { root.querySelector(".heat-none").checked = true; choose(); }
        });
      });
    }
    const slider = root.querySelector("input.opacity");
    if (slider) {
      const apply = () => viewer.setOpacity(Number(slider.value) / 100);
      slider.addEventListener("input", apply);
      apply();
    }
    choose();
  }

  // ------------------------------------------------------------------- next / previous study
  const nav = document.getElementById("study-nav");
  let order = [];
  let back = "/worklist";
  try {
    order = JSON.parse(window.sessionStorage.getItem("worklist.order") || "[]");
    back = window.sessionStorage.getItem("worklist.url") || back;
  } catch (err) { order = []; }
  const here = nav ? nav.dataset.uid : null;
  const at = order.indexOf(here);
  const link = (id, uid) => {
    const a = document.getElementById(id);
    if (!a || !uid) return null;
    a.href = "/studies/" + encodeURIComponent(uid);
    a.hidden = false;
    return a.href;
  };
  const prevUrl = at > 0 ? link("prev-study", order[at - 1]) : null;
  const nextUrl = at >= 0 && at + 1 < order.length ? link("next-study", order[at + 1]) : null;
  const backLink = document.getElementById("back-to-worklist");
  if (backLink) backLink.href = back;

  async function markReadAndGoOn() {
    const response = await window.setReadState(here, "read");
    if (!response.ok) { window.alert("Could not mark the study read (HTTP " + response.status + ")."); return; }
    window.location.href = nextUrl || back;
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target && (target.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName))) return;
    // A focused button or link keeps Enter and space for itself; letters still reach the page.
    if (target && ["BUTTON", "A"].includes(target.tagName) && (event.key === "Enter" || event.key === " ")) return;
    if (event.key === "n" && nextUrl) { window.location.href = nextUrl; return; }
    if (event.key === "p" && prevUrl) { window.location.href = prevUrl; return; }
    if (event.key === "m" && here) { markReadAndGoOn(); return; }
    const viewer = hovered || viewers[0];
    if (viewer && viewer.meta && viewer.key(event)) event.preventDefault();
  });
})();
