#!/usr/bin/env bash
# Lines of code per crate: non-blank, non-comment lines of Rust (.rs) and CUDA C (.cu, .cuh),
# as a Markdown table (docs/architecture.md quotes it).
#
# Counted: the files git knows (tracked, plus untracked ones that .gitignore does not exclude),
# so build folders and generated PTX never count. Left out: everything under a tests/ or
# fixtures/ folder. A line is a comment when, after leading blanks, it starts with `//` (which
# covers `///` and `//!` docs) or lies inside a `/* ... */` block that opens at the start of a
# line; a line with code and a trailing comment is code.
#
# Columns:
#   library   .rs under src/ plus build.rs, without unit tests
#   cuda      .cu / .cuh kernel sources
#   tools     .rs under examples/ and benches/ (GPU check and timing tools, criterion benches)
#   unit tests  in-file test modules (`#[cfg(test)]` at the start of a line followed by a
#             `mod ... {`, up to the `}` that closes it at the start of a line) and test-only
#             files named testutil.rs
#
# Usage: scripts/loc.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

git ls-files --cached --others --exclude-standard -- '*.rs' '*.cu' '*.cuh' \
    | grep -Ev '(^|/)(tests|fixtures)/' \
    | sort \
    | while IFS= read -r f; do
        [ -f "$f" ] || continue # deleted in the working tree
        crate=${f%%/*}
        [ "$crate" = "$f" ] && crate="(root)"
        case "$f" in
        *.cu | *.cuh) kind=cuda ;;
        */examples/* | */benches/*) kind=tools ;;
        */testutil.rs) kind=unit ;;
        *) kind=library ;;
        esac
        # One line per file: crate, kind, code lines, unit-test lines.
        awk -v crate="$crate" -v kind="$kind" '
            BEGIN { code = 0; unit = 0; in_block = 0; in_test = 0; pending = 0 }
            {
                line = $0
                sub(/^[ \t]+/, "", line)
                if (in_block) {
                    if (index(line, "*/")) in_block = 0
                    next
                }
                if (line == "") next
                if (substr(line, 1, 2) == "/*") {
                    if (!index(substr(line, 3), "*/")) in_block = 1
                    next
                }
                if (substr(line, 1, 2) == "//") next
                if (kind == "library" || kind == "tools") {
                    if ($0 ~ /^#\[cfg\(test\)\]/) { pending = 1; unit++; next }
                    if (pending) {
                        pending = 0
                        if ($0 ~ /^(pub(\([a-z]+\))? )?mod [A-Za-z_0-9]+ \{/) { in_test = 1; unit++; next }
                    }
                    if (in_test) {
                        unit++
                        if ($0 ~ /^\}/) in_test = 0
                        next
                    }
                }
                if (kind == "unit") unit++; else code++
            }
            END { print crate, kind, code, unit }
        ' "$f"
    done \
    | awk '
        {
            crate = $1; kind = $2
            seen[crate] = 1
            if (kind == "unit") unit[crate] += $4
            else { n[crate, kind] += $3; unit[crate] += $4 }
        }
        END {
            order = "nanovllm-utils nanovllm-kernels nanovllm-layers nanovllm-models nanovllm-engine nanovllm benches"
            k = split(order, names, " ")
            for (c in seen) {
                listed = 0
                for (i = 1; i <= k; i++) if (names[i] == c) listed = 1
                if (!listed) names[++k] = c
            }
            printf "| crate | library (.rs) | cuda (.cu/.cuh) | tools (.rs) | unit tests (.rs) | total |\n"
            printf "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            for (i = 1; i <= k; i++) {
                c = names[i]
                if (!(c in seen)) continue
                lib = n[c, "library"] + 0; cu = n[c, "cuda"] + 0; tl = n[c, "tools"] + 0; ut = unit[c] + 0
                printf "| %s | %d | %d | %d | %d | %d |\n", c, lib, cu, tl, ut, lib + cu + tl + ut
                tlib += lib; tcu += cu; ttl += tl; tut += ut
            }
            printf "| **all** | %d | %d | %d | %d | %d |\n", tlib, tcu, ttl, tut, tlib + tcu + ttl + tut
        }
    '
