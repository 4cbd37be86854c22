#!/usr/bin/env bash
# Elastix baseline on the simulated 4DCT set; writes benchmarks/elastix_sim4dct.md from the report.
# Run from the repository root with ../shared/data/dirlab4dct_landmarks present (drives the motion).
set -euo pipefail
out=${1:-/tmp/regsam_bench_elastix_sim4dct}
regsam bench --dataset sim4dct --methods elastix:lung,elastix:fast --out "$out"
{
  echo "# Elastix on sim4dct"
  echo
  echo "Command (run from the repository root, ../shared beside it): \`bash benchmarks/elastix_sim4dct.sh\`,"
  echo "i.e. \`regsam bench --dataset sim4dct --methods elastix:lung,elastix:fast --out $out\`."
  echo
  echo "Machine: $(nproc) CPU cores, $(free -g | awk '/Mem:/{print $2}') GB, shared with other jobs; $(date -u +%Y-%m-%d)."
  echo
  sed -n '/^## Summary/,/^## TRE per case/p' "$out/report.md" | sed '$d'
} > benchmarks/elastix_sim4dct.md
