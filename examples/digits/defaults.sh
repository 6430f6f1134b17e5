# The digits demo's training settings, sourced by run.sh and ablations.sh so the two agree.
# Each DIGITS_* variable in the environment overrides its default.
STEPS1="${DIGITS_STEPS1:-40}"     # stage 1 steps
STEPS2="${DIGITS_STEPS2:-400}"    # stage 2 steps
BATCH="${DIGITS_BATCH:-32}"       # samples a step
LR1="${DIGITS_LR1:-1e-3}"         # stage 1 peak learning rate
LR2="${DIGITS_LR2:-2e-3}"         # stage 2 peak learning rate (300 steps: 5e-3 and 1e-2 gave captions 59 % and 53 %, 1e-3 78 %, 2e-3 74 %)
# Copies of the caption records in stage 2's data: captioning is the slowest task to learn, speech
# and drawing the fastest (300 steps at lr 2e-3, captions x1 / x2 / x4: caption accuracy 74 / 87 / 91 %,
# spoken digits 100 % each time, drawing 100 / 100 / 90 %).
CAPTION_REPEAT="${DIGITS_CAPTION_REPEAT:-4}"
# All copies but the first draw their image ids at this temperature (teal tokenize --sample-temperature;
# squared 0..1 pixel units over the caption codec's patch; 0: identical copies). Measured with captions read
# through the 4x4 quadrant codec (DIGITS_READ_PATCH=4), 400 steps, AMD EPYC, same stage-1 model: identical copies 90.6 % captions (an earlier full run on this CPU type); T 0.15 (15 % of the ids move)
# 93.1 / 91.7 / 90.6 % over three sets of draws (within the draw-to-draw spread, so not the default);
# T 0.5 (55 % move) 88.1 %.
CAPTION_TEMPERATURE="${DIGITS_CAPTION_TEMPERATURE:-0}"
T2I_TEMPERATURE="${DIGITS_T2I_TEMPERATURE:-0.7}"   # the sampled text -> image evaluation (6d)
