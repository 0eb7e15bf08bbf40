"""calibrate's tuning constants, in one place (each one's trade-off beside it)."""

#: screening: with more than SCREEN_MIN candidates for a layer, all of them are first measured on
#: a probe (the first call, at most SCREEN_KV_HEADS kv heads and SCREEN_BATCH batch items) and only
#: those within SCREEN_SLACK x the probe's Pareto front are measured in full (a 2-5x saving)
SCREEN_MIN, SCREEN_KV_HEADS, SCREEN_BATCH, SCREEN_SLACK = 6, 2, 4, 1.2

#: default cap on end-to-end runs of the search: EVALS_PER_LAYER * layers + EVALS_EXTRA
EVALS_PER_LAYER, EVALS_EXTRA = 2, 12

#: sensitivity probes approximate one layer (group) at the front point whose error is closest to
#: PROBE_ERROR (log scale); the fitted coefficients are floored at SENS_FLOOR x their median (a
#: probe that did no harm must not make a layer look free) and trusted up to TRUST x the probe's
#: error (on SmolLM2 a layer harmless at error 0.15 ruined perplexity at 0.6)
PROBE_ERROR, SENS_FLOOR, TRUST = 0.15, 0.1, 2.0

#: knapsack resolution (bins of the allowed deficit), allocation rounds with measured corrections,
#: and the share of the allowed deficit at which a passing allocation is close enough
DP_BINS, CORRECTIONS, GOOD_ENOUGH = 1000, 5, 0.97
