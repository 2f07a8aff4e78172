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

$(STAMP): pyproject.toml backend/build.sh $(wildcard backend/*.patch)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	bash backend/build.sh $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	rm -f $(VENV)/.installed*
	touch $@

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/llava ask --model demo examples/shapes-1.png "Describe the image in detail."

clean:
	rm -rf $(VENV) build *.egg-info
