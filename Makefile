# The README's commands. `make demo` and `make test` each set up everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# napari needs a real OpenGL context (offscreen Qt fails): tests run under Xvfb with Mesa.
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3 chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: venv sysdeps demo test bench lint clean

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this machine; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spadkit demo --out demo_output

# System packages for the GUI tests (Debian/Ubuntu); skipped when Xvfb and Mesa are present.
sysdeps:
	@if command -v xvfb-run >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && ls /usr/lib/*/dri/swrast_dri.so >/dev/null 2>&1; then :; else \
		echo "installing Xvfb and Mesa OpenGL (napari tests) and Chromium (notebook browser test) with apt-get"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; fi

test: sysdeps $(STAMP)
	xvfb-run -a -s "-screen 0 1280x1024x24" $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/chunking.py --out benchmarks/results/chunking.json
	$(PY) benchmarks/loader.py --seconds 20 --out benchmarks/results/loader.json
	$(PY) benchmarks/loader.py --regime large --out benchmarks/results/loader_large.json
	$(PY) benchmarks/pretrain.py --out benchmarks/results/pretrain.json
	$(PY) benchmarks/ingest_memory.py --cases 1 --workers 1 --json benchmarks/results/ingest_memory_current.json
	$(VENV)/bin/spadkit demo --out demo_output
	$(PY) benchmarks/feature_probe.py --weights demo_output/weights/spad_vit_test --out benchmarks/results/feature_probe.json
	$(PY) benchmarks/label_save.py --out benchmarks/results/label_save.json
	$(PY) benchmarks/finetune_speed.py --out benchmarks/results/finetune_speed.json
	$(PY) benchmarks/inference.py --out benchmarks/results/inference.json
	$(PY) benchmarks/label_efficiency.py --weights demo_output/weights/spad_vit_test --out benchmarks/results/label_efficiency.json
	$(PY) benchmarks/unimed.py --arms light_head pretrained --out benchmarks/results/unimed.json
	xvfb-run -a -s "-screen 0 1280x1024x24" $(PY) benchmarks/annotation_loop.py --out benchmarks/results/annotation_loop.json

lint: $(STAMP)
	$(VENV)/bin/ruff check spadkit tests benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache
