#!/usr/bin/env bash
# Vendor the JavaScript that the built book needs, so that the HTML renders math and
# ipywidgets with no CDN (fully offline).
#
#   bash scripts/vendor_web.sh        # idempotent: does nothing when already present
#   FORCE=1 bash scripts/vendor_web.sh  # re-download and re-extract
#
# `_vendor/.complete` (the versions, written last) marks a finished extraction; the Makefile
# uses it as its target.
#
# Downloads two tarballs from the npm registry with `npm pack` (needs node/npm, nothing else),
# checks their SHA-256 against the pins below, and extracts only the needed files into
# `_vendor/` at the repository root (gitignored). `_config.yml` points `html_static_path`,
# `mathjax_path` and `nb_ipywidgets_js` at this folder; Sphinx copies it into
# `_build/html/_static/`. The folder is deliberately NOT `book/_static/` nor a root `_static/`:
# jupyter-book 1.x adds a <script> tag for every .js file found under a root `_static/`.
#
# Result:
#   _vendor/mathjax/tex-mml-chtml.js          MathJax 3 (+ its fonts, TeX extensions, menu, a11y)
#   _vendor/jupyter-widgets/embed.js          ipywidgets 8 html-manager, non-AMD bundle with the
#                                             standard controls built in (no require.js needed)
#   _vendor/jupyter-widgets/mathjax2-compat.js  tiny adapter so embed.js can typeset with MathJax 3
set -euo pipefail

HTML_MANAGER_VERSION=1.0.15
HTML_MANAGER_SHA256=2b9d65cb7913e1c7d671757a10008b32c9c2448d4429513371e55c07d6107638
MATHJAX_VERSION=3.2.2
MATHJAX_SHA256=1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${VENDOR_DIR:-$ROOT/_vendor}"
# Bump VENDOR_LAYOUT when the extracted file set or the adapter below changes.
VENDOR_LAYOUT=2
STAMP_TEXT="html-manager=$HTML_MANAGER_VERSION mathjax=$MATHJAX_VERSION layout=$VENDOR_LAYOUT"

if [[ -z "${FORCE:-}" && -f "$DEST/.complete" && "$(cat "$DEST/.complete")" == "$STAMP_TEXT" \
      && -f "$DEST/mathjax/tex-mml-chtml.js" && -f "$DEST/jupyter-widgets/embed.js" \
      && -f "$DEST/jupyter-widgets/mathjax2-compat.js" ]]; then
    touch "$DEST/.complete"  # keeps make's `_vendor/.complete: scripts/vendor_web.sh` rule satisfied
    echo "vendor_web: $DEST is up to date ($STAMP_TEXT)"
    exit 0
fi

command -v npm >/dev/null || { echo "vendor_web: npm not found (install node.js)" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "vendor_web: fetching $STAMP_TEXT from the npm registry"
(cd "$TMP" && npm pack --silent --loglevel=error --ignore-scripts \
    "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" "mathjax@$MATHJAX_VERSION" >/dev/null)

HM_TGZ="$TMP/jupyter-widgets-html-manager-$HTML_MANAGER_VERSION.tgz"
MJ_TGZ="$TMP/mathjax-$MATHJAX_VERSION.tgz"
echo "$HTML_MANAGER_SHA256  $HM_TGZ" | sha256sum --check --quiet
echo "$MATHJAX_SHA256  $MJ_TGZ" | sha256sum --check --quiet

NEW="$TMP/vendor"
mkdir -p "$NEW/mathjax" "$NEW/jupyter-widgets" "$TMP/hm" "$TMP/mj"

# ipywidgets html-manager: embed.js and the font files it loads relative to its own URL.
tar -xzf "$HM_TGZ" -C "$TMP/hm" package/dist package/package.json
find "$TMP/hm/package/dist" -maxdepth 1 -type f \
    \( -name 'embed.js' -o -name 'embed.js.LICENSE.txt' -o -name '*.woff2' -o -name '*.woff' \
       -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' \) -exec cp {} "$NEW/jupyter-widgets/" \;
cp "$TMP/hm/package/package.json" "$NEW/jupyter-widgets/package.json"

# MathJax 3: the combined TeX+MathML/CHTML component plus what it loads on demand
# (TeX extensions, CHTML fonts, the context menu, accessibility and speech modules).
tar -xzf "$MJ_TGZ" -C "$TMP/mj" package/LICENSE package/package.json package/es5
MJ="$TMP/mj/package/es5"
mkdir -p "$NEW/mathjax/output"
cp "$MJ/tex-mml-chtml.js" "$NEW/mathjax/"
cp -r "$MJ/input" "$MJ/ui" "$MJ/a11y" "$MJ/sre" "$NEW/mathjax/"
cp -r "$MJ/output/chtml" "$MJ/output/chtml.js" "$NEW/mathjax/output/"
cp "$TMP/mj/package/LICENSE" "$TMP/mj/package/package.json" "$NEW/mathjax/"

# The html-manager typesets widget labels with the MathJax 2 API (MathJax.Hub.Queue), which
# MathJax 3 lacks: without this adapter every widget logs a TypeError. Loaded before embed.js.
cat > "$NEW/jupyter-widgets/mathjax2-compat.js" <<'JS'
/* Adapter: lets @jupyter-widgets/html-manager call MathJax.Hub.Queue(["Typeset", MathJax.Hub, el])
   on a page that loads MathJax 3. Written by scripts/vendor_web.sh. */
(function () {
  function typeset(mj, el) {
    var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
    ready.then(function () {
      if (mj.typesetPromise) { return mj.typesetPromise(el ? [el] : undefined); }
    }).catch(function (err) { console.warn("MathJax typeset failed", err); });
  }
  function install() {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.version || String(mj.version).charAt(0) === "2") { return; }
    mj.Hub = {
      Queue: function () {
        for (var i = 0; i < arguments.length; i++) {
          var job = arguments[i];
          if (Array.isArray(job) && job[0] === "Typeset") { typeset(mj, job[2]); }
        }
      }
    };
  }
  window.addEventListener("DOMContentLoaded", install);
  window.addEventListener("load", install);
})();
JS

echo "$STAMP_TEXT" > "$NEW/.complete"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$NEW" "$DEST"
echo "vendor_web: wrote $DEST ($(du -sh "$DEST" | cut -f1))"
