# The digits demo's training settings, sourced by run.sh and ablations.sh so the two agree.
# Each DIGITS_* variable in the environment overrides its default. The measurements behind them
# are in benchmarks/README.md ("digits demo settings").
STEPS1="${DIGITS_STEPS1:-40}"     # stage 1 steps
STEPS2="${DIGITS_STEPS2:-400}"    # stage 2 steps
BATCH="${DIGITS_BATCH:-32}"       # samples a step
LR1="${DIGITS_LR1:-1e-3}"         # stage 1 peak learning rate
LR2="${DIGITS_LR2:-2e-3}"         # stage 2 peak learning rate (5e-3 and up lost a fifth of the captions)
# Copies of the caption records in stage 2's data: captioning is the slowest task to learn
# (x4 took caption accuracy from 74 to 91 % at 300 steps, speech unchanged).
CAPTION_REPEAT="${DIGITS_CAPTION_REPEAT:-4}"
# All copies but the first draw their image ids at this temperature (teal tokenize --sample-temperature;
# squared 0..1 pixel units over the caption codec's patch; 0: identical copies). Sampled copies gained
# no more than the spread between draws, so 0.
CAPTION_TEMPERATURE="${DIGITS_CAPTION_TEMPERATURE:-0}"
T2I_TEMPERATURE="${DIGITS_T2I_TEMPERATURE:-0.7}"   # the sampled text -> image evaluation (6d)
