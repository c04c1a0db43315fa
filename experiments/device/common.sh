# Sourced by the device scripts: unbuffered Python, the repository root as the working
# directory, and the step clock that their summary lines print.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
done_part() { echo "== $1: rc $2 at $(elapsed) s"; }
