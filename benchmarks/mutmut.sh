#!/bin/sh
# Mutation testing of dsnet's core modules with mutmut 3 (pip install mutmut), outside CI.
#
#   [DSNET_REF=<commit>] sh benchmarks/mutmut.sh [WORK_DIR] [MUTANT_GLOB ...]
#
# Copies the checkout (its tracked and new files, or the commit DSNET_REF) to WORK_DIR (default
# /tmp/dsnet-mutmut), adds the [mutmut] section there (the checkout's setup.cfg stays free of it),
# runs the mutants against the fast tests that pin the core and prints mutmut's results.
# Without MUTANT_GLOBs it runs the core: IEB, SGS, routes, count_madds, the evaluation's counting
# and cost functions and the switchable BN layer's training path. mutmut leaves decorated
# functions (evaluate_static/_dynamic under inference_mode, recalibrate_bn and frozen_forward
# under no_grad) and properties unmutated.
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/dsnet-mutmut}
[ $# -gt 0 ] && shift
rm -rf "$work"
mkdir -p "$work"
paths="dsnet tests configs setup.cfg pyproject.toml README.md"
if [ -n "${DSNET_REF:-}" ]; then
    (cd "$src" && git archive "$DSNET_REF" $paths) | tar -xf - -C "$work"
else
    (cd "$src" && git ls-files -co --exclude-standard $paths | tar -cf - -T -) | tar -xf - -C "$work"
fi
# one intra-op thread: a forked mutant must not inherit a busy OpenMP pool
sed -i 's/^torch.set_num_threads(2)$/torch.set_num_threads(1)/' "$work/tests/conftest.py"
tests=""
for t in test_ieb test_sgs test_layers test_recalibrate test_policy test_metrics; do
    [ -f "$work/tests/$t.py" ] && tests="$tests    tests/$t.py
"
done
cat >> "$work/setup.cfg" <<CFG

[mutmut]
source_paths = dsnet
only_mutate =
    dsnet/train/ieb.py
    dsnet/train/sgs.py
    dsnet/models/routes.py
    dsnet/models/madds.py
    dsnet/train/metrics.py
    dsnet/train/evaluate.py
    dsnet/train/policy_select.py
    dsnet/train/recalibrate.py
    dsnet/layers/slimmable.py
timeout_multiplier = 100.0
timeout_constant = 120.0
pytest_add_cli_args_test_selection =
$tests
CFG
cd "$work"
export OMP_NUM_THREADS=1
[ $# -gt 0 ] || set -- 'dsnet.train.ieb.*' 'dsnet.train.sgs.*' 'dsnet.models.routes.*' 'dsnet.models.madds.x_count_madds*' \
    'dsnet.train.metrics.x_topk_correct*' 'dsnet.train.policy_select.x_cost_bias*' \
    'dsnet.train.evaluate.x_static_curve*' 'dsnet.layers.slimmable.xǁDSBatchNorm2dǁforward*' \
    'dsnet.layers.slimmable.xǁDSBatchNorm2dǁrow*' 'dsnet.layers.slimmable.xǁDSBatchNorm2dǁ_slices*' \
    'dsnet.layers.slimmable.xǁDSBatchNorm2dǁreset_running_stats*' 'dsnet.layers.slimmable.xǁDSBatchNorm2dǁchoice_index*'
nice -n 10 mutmut run --max-children 1 "$@" || true
mutmut results
