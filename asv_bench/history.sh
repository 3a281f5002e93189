#!/usr/bin/env bash
# fisheropt's performance history: benchmark the last N commits of main that change code
# (fisheropt/, refimpl/, backends/, pyproject.toml), each built in asv's virtualenvs
# (asv.conf.json), then publish the site. Commits already benchmarked on this machine are
# skipped, so a rerun only adds new commits.
#
#   bash asv_bench/history.sh            # N = 12, the tracked figures
#   bash asv_bench/history.sh 20 --quick # more commits; extra arguments go to asv run
#   FO_ASV_BENCH='^bench_optim\.Finite' bash asv_bench/history.sh 12 --quick   # other benchmarks
#   cd asv_bench && asv preview          # http://127.0.0.1:8080
#
# Time: 28 min for 12 commits from a fresh clone on the shared 2-core development machine,
# creating the two environments included (about 2 min per commit; more on a busier machine).
set -euo pipefail
cd "$(dirname "$0")"
n=${1:-12}
shift || true
bench=${FO_ASV_BENCH:-'^bench_track\.Ratios\.|^bench_memory\.'}
mkdir -p .asv
git -C .. log --first-parent --format=%H -n "$n" main -- fisheropt refimpl backends pyproject.toml \
    > .asv/history-commits.txt
echo "history: $(wc -l < .asv/history-commits.txt) commits of main that change code, benchmarks /$bench/"
[ -f "$HOME/.asv-machine.json" ] || asv machine --yes
start=$(date +%s)
rc=0
# exit status 2 = some benchmark failed at some commit (shown above as "failed"); keep going
asv run --skip-existing-commits --show-stderr -b "$bench" "$@" HASHFILE:.asv/history-commits.txt || rc=$?
asv publish
python offline_site.py        # the site's scripts from vendor/site/, not from CDNs
echo "history: done in $(( $(date +%s) - start )) s (asv run exit status $rc); view with: cd asv_bench && asv preview"
[ "$rc" -eq 0 ] || [ "$rc" -eq 2 ]
