# make install   .venv with the runtime, convert, train and test tools, and the fixed llama.cpp backend
# make test      installs if needed, then runs the test suite
# make demo      installs if needed, then asks the shipped demo model about an example image
#
# GPU builds of the backend: make install GPU=cuda (or GPU=metal). TORCH picks the torch wheel for convert/train.

VENV   ?= .venv
PY     := $(VENV)/bin/python
GPU    ?=
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed$(if $(GPU),-$(GPU))

ifeq ($(GPU),cuda)
  export CMAKE_ARGS := -DGGML_CUDA=on $(CMAKE_ARGS)
else ifeq ($(GPU),metal)
  export CMAKE_ARGS := -DGGML_METAL=on $(CMAKE_ARGS)
else ifneq ($(GPU),)
  $(error GPU must be cuda, metal or empty, not '$(GPU)')
endif

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml backend/build.sh backend/llava-cls-first.patch
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	bash backend/build.sh $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	rm -f $(VENV)/.installed*
	touch $@

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

DEMO_GGUF := llavacli/data/demo/demo.gguf
TINY_GGUF := $(VENV)/tiny-demo/gguf/tiny-demo.gguf

demo: install
	@if [ -f $(DEMO_GGUF) ]; then model=demo; else \
	  echo "demo: the trained demo model is not shipped yet; asking a tiny random LLaVA built here (its answer is noise)" >&2; \
	  [ -f $(TINY_GGUF) ] || $(PY) examples/tiny_demo.py $(VENV)/tiny-demo >/dev/null 2>&1 || exit 1; \
	  model=$(TINY_GGUF); fi; \
	set -x; $(VENV)/bin/llava ask --model $$model examples/shapes-1.png "What shapes do you see?" --max-tokens 32

clean:
	rm -rf $(VENV) build *.egg-info
