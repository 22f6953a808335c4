// Heatmap overlays: one checkbox per finding shows or hides its layer, one slider sets the
// opacity of every layer of that image.
(function () {
  "use strict";
  document.querySelectorAll(".instance").forEach((article) => {
    const layers = (finding) => article.querySelectorAll('img.heatmap[data-finding="' + finding + '"]');
    article.querySelectorAll("input.toggle-heatmap").forEach((box) => {
      box.addEventListener("change", () => {
        layers(box.dataset.finding).forEach((img) => img.classList.toggle("hidden", !box.checked));
      });
    });
    const slider = article.querySelector("input.opacity");
    if (slider) {
      const apply = () => article.querySelectorAll("img.heatmap").forEach((img) => { img.style.opacity = String(slider.value / 100); });
      slider.addEventListener("input", apply);
      apply();
    }
  });
})();
