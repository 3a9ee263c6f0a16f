# The two commands of the README:
#   make book   set up .venv, prepare the data, execute every chapter and build the site (strict)
#   make test   set up .venv, prepare the data, run the unit tests and `pytest --nbval book`
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

.PHONY: book test setup data vendor unit nbval clean stress

book: setup data vendor
	@start=$$(date +%s); \
	$(VENV)/bin/jupyter-book build -W -n --keep-going . && \
	echo "Built in $$(( $$(date +%s) - start )) s. Open _build/html/index.html"

test: setup data unit nbval

unit: setup
	$(PY) -m pytest tests -q

nbval: setup data
	$(PY) -m pytest --nbval book -q -p no:cacheprovider --nbval-cell-timeout=600 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

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
