/* Our own few lines, not vendored: loaded after require.js and before embed-amd.js.
 *
 * 1. Fonts. embed-amd.js defines the @jupyter-widgets/* modules by name and looks for
 *    its icon fonts next to each module's require.js URL. Map the names to this folder,
 *    so the fonts (the *.woff2 files here) load from the built site on every page,
 *    whatever its depth. The modules are already defined, so nothing else is fetched.
 * 2. Math. The widgets typeset their labels with MathJax 2's `MathJax.Hub.Queue`; the
 *    book runs MathJax 3, which has no `Hub`, so every widget page threw a TypeError
 *    (ipywidgets issue #3829). Give MathJax 3 a one-call stand-in for it. Sphinx's MathJax
 *    knows \(...\) but not $...$: write math in a widget description as r"\(p\) devices".
 */
(function () {
  var here = document.currentScript.src.replace(/[^\/]*$/, "");
  var names = ["base", "base7", "controls", "controls7", "html-manager",
               "html-manager/dist/libembed-amd"];
  var paths = {};
  names.forEach(function (name) {
    paths["@jupyter-widgets/" + name] = here + name.split("/").pop();
  });
  window.require.config({ paths: paths });

  // MathJax 3 replaces window.MathJax while it starts, so add Hub once it has (before
  // the widgets render, which waits for "load" and registers its handler after this one).
  window.addEventListener("load", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.startup) return;
    mj.Hub = {
      Queue: function (job) {  // job is ["Typeset", MathJax.Hub, element]
        mj.startup.promise.then(function () { return mj.typesetPromise([job[2]]); });
      }
    };
  });
})();
