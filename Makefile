# The two commands of the README:
#   make book   set up .venv, prepare the data, execute every chapter and build the site (strict)
#   make test   set up .venv, prepare the data, run the unit tests and `pytest --nbval` on every chapter
#               (from an empty folder, with lm installed from a wheel: see the nbval target)
# Everything comes from the package registries; nothing needs installing by hand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := data/shakespeare/train.bin data/pydoc/train.bin data/cache/gpt2.tiktoken
VENDOR := _vendor/.complete
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Chapters measure and assert their own results; fix the thread count so runs are comparable.
export OMP_NUM_THREADS ?= 2
# OpenMP threads that wait for each other spin for a while before sleeping. On a CPU shared with other
# work, a thread spins while its partner is descheduled, and 2 threads ran a training loop 5-25x slower
# than on an idle CPU; with short spins, 1.6-2.3x (scripts/threads_under_load.py, 2 cores). Short spins
# cost nothing on an idle CPU, where OMP_WAIT_POLICY=PASSIVE would cost 30%. Chapters set it as well.
export GOMP_SPINCOUNT ?= 5000

.PHONY: book test setup data vendor unit nbval clean stress check-site site-test shakespeare-model

# A failed build (a cell that raises or runs past the limit, any Sphinx warning) fails loudly and
# leaves no site behind: a half-built _build/html would show tracebacks next to stale outputs.
book: setup data vendor
	@start=$$(date +%s); \
	if $(VENV)/bin/jupyter-book build -W -n --keep-going .; then \
		echo "Built in $$(( $$(date +%s) - start )) s. Open _build/html/index.html"; \
	else \
		rm -rf _build/html; \
		echo "make book: the build FAILED (see the errors above); _build/html was removed." >&2; exit 1; \
	fi

test: setup data unit nbval site-test

# Chapter 7's "model worth reading", lm/assets/shakespeare_char.pt, made again from scratch: about
# 2.5 minutes on one H200, about 4 hours on 2 CPU cores. The file is committed; nothing else needs this.
shakespeare-model: setup data
	$(PY) scripts/make_shakespeare_model.py

# Open every page of the built site (run `make book` first) in headless Chromium, from disk, with the
# network blocked: JavaScript errors, math typeset, images and alt texts, widgets rendered, internal
# links, no request leaving the machine. One line per page; a screenshot of each in _build/site-check/.
# The checker needs only the standard library and Chromium (installed here from Debian if missing).
# Whole-page screenshots instead of the first screen: make check-site CHECK_SITE_ARGS=--full-page
CHECK_SITE_ARGS ?=
CHROMIUM := command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
check-site: setup
	$(CHROMIUM)
	$(PY) scripts/check_site.py _build/html --screenshots _build/site-check $(CHECK_SITE_ARGS)

# The same browser check inside `make test`, on a site built in a temporary folder from the chapters'
# stored outputs (nbval has just shown that they reproduce) without executing them again: a strict
# Sphinx build (-W) and every page in Chromium. Where Chromium is neither installed nor installable
# (no root, no Debian mirror), the browser half is skipped with a message saying so.
site-test: setup vendor
	@set -e; tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/lm-site.XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
	sed 's/^  execute_notebooks: force/  execute_notebooks: "off"/' _config.yml > "$$tmp/_config.yml"; \
	grep -q 'execute_notebooks: "off"' "$$tmp/_config.yml"; \
	start=$$(date +%s); \
	$(VENV)/bin/jupyter-book build -W -n --keep-going --config "$$tmp/_config.yml" --path-output "$$tmp" . >"$$tmp/build.log" 2>&1 \
		|| { cat "$$tmp/build.log"; echo "site-test: the strict build FAILED" >&2; exit 1; }; \
	echo "site-test: site built from the stored outputs in $$(( $$(date +%s) - start )) s"; \
	if $(CHROMIUM); then \
		$(PY) scripts/check_site.py "$$tmp/_build/html"; \
	else \
		echo "site-test: SKIPPED the browser check: Chromium is not installed and apt-get could not install it"; \
	fi

unit: setup
	$(PY) -m pytest tests -q

# The chapters run as a reader's copy runs them: from an empty folder, with `lm` installed from a
# wheel (its package data, lm/assets, included) and not imported from this checkout.
#   1. build a wheel from a copy of the sources (nothing is written into the checkout),
#   2. install it with --target into $tmp/site, which goes first on PYTHONPATH, ahead of the
#      editable install in .venv (the check below fails if the checkout's lm is imported instead),
#   3. copy the notebooks and the sanitize file to $tmp/book and run `pytest --nbval` there.
# LM_DATA_DIR points at the prepared data/, so the corpora are not fetched or tokenized again.
nbval: setup data
	@set -e; tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/lm-nbval.XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p "$$tmp/src" "$$tmp/wheel" "$$tmp/site" "$$tmp/book"; \
	cp -R pyproject.toml README.md lm "$$tmp/src/"; \
	$(PY) -m pip wheel --quiet --no-deps -w "$$tmp/wheel" "$$tmp/src"; \
	$(PY) -m pip install --quiet --no-deps --target "$$tmp/site" "$$tmp"/wheel/lm-*.whl; \
	cp book/*.ipynb tests/nbval_sanitize.cfg "$$tmp/book/"; \
	export PYTHONPATH="$$tmp/site" LM_DATA_DIR="$(CURDIR)/data"; \
	cd "$$tmp/book"; \
	$(CURDIR)/$(PY) -c 'import lm, sys; assert lm.__file__.startswith(sys.argv[1]), lm.__file__' "$$tmp/site"; \
	echo "nbval: book/*.ipynb in $$tmp/book, lm from its wheel in $$tmp/site"; \
	$(CURDIR)/$(PY) -m pytest --nbval . -q -p no:cacheprovider --nbval-cell-timeout=600 \
		--nbval-sanitize-with nbval_sanitize.cfg

setup: $(STAMP)

# torch first and pinned: an open range would pull a multi-GB CUDA build (see shared FACTS).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[book,serve,test]"
	touch $(STAMP)

data: $(DATA)

data/shakespeare/train.bin: | $(STAMP)
	$(PY) -m lm prep --corpus shakespeare --out_dir data/shakespeare

data/pydoc/train.bin: | $(STAMP)
	$(PY) -m lm prep --corpus pydoc --out_dir data/pydoc

# GPT-2's BPE ranks, from the openai-whisper source archive on PyPI (tiktoken's own download
# needs a host the package registries do not include).
data/cache/gpt2.tiktoken: | $(STAMP)
	$(PY) -c "from lm.tokenizers import gpt2_ranks_path; print(gpt2_ranks_path())"

vendor: $(VENDOR)

$(VENDOR): scripts/vendor_web.sh
	bash scripts/vendor_web.sh

# Fault injection: hundreds of tiny `lm train` runs killed (SIGKILL, SIGINT, SIGTERM) at random points and
# resumed; prints the tally (trials, last.pt loadable, resumed exactly). About 10 minutes per 100 trials on 2 cores.
STRESS_TRIALS ?= 300
stress: setup
	OMP_NUM_THREADS=1 $(PY) scripts/stress.py --trials $(STRESS_TRIALS) --jobs 2

clean:
	rm -rf _build book/runs
