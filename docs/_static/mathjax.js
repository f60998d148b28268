// MathJax 3 configuration, following
// https://squidfunk.github.io/mkdocs-material/reference/math/#mathjax
//
// Two sources of maths are typeset, and nothing else:
// - pymdownx.arithmatex (generic mode) wraps the `$...$` / `$$...$$` maths of the
//   pages and docstrings as `\(...\)` / `\[...\]` in elements of class "arithmatex";
// - the notebooks' Markdown cells (rendered by mkdocs-jupyter, class
//   "jp-RenderedMarkdown") keep their `$...$` / `$$...$$` maths verbatim. MathJax only
//   looks inside elements whose own class matches `processHtmlClass`, so
//   `markNotebookMaths` tags every element of those cells with the class "nb-math".
//   The navigation entries made from the notebooks' headings get the same treatment.
function markNotebookMaths() {
  const mark = (root) => {
    root.classList.add("nb-math");
    root.querySelectorAll("*").forEach((el) => el.classList.add("nb-math"));
  };
  document.querySelectorAll(".jp-RenderedMarkdown").forEach(mark);
  document.querySelectorAll(".md-nav__link").forEach((link) => {
    if (link.textContent.includes("$")) mark(link);
  });
}

window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|nb-math",
  },
  startup: {
    pageReady() {
      markNotebookMaths();
      return MathJax.startup.defaultPageReady();
    },
  },
};

// Re-typeset after material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      markNotebookMaths();
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
