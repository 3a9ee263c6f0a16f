// Plots inside a widget's saved output are drawn by the widget manager, which gives its images no
// alt text. Name them after the widget they belong to, so a screen reader can announce them.
(function () {
  function label(root) {
    root.querySelectorAll(".jupyter-widgets img:not([alt]), .widget-output img:not([alt]), " +
                          ".jupyter-widgets img[alt=''], .widget-output img[alt='']").forEach(function (img) {
      img.alt = "Plot drawn by the interactive widget above, for its saved settings " +
                "(run the notebook to change them)";
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    label(document);
    new MutationObserver(function () { label(document); })
      .observe(document.body, { childList: true, subtree: true });
  });
})();
