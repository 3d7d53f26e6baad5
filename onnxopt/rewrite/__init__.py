"""Rewrites before the plan, one module per technique holding its algorithm and its pass: `sparsity` (+ `sparsity_layers`,
`sparsegpt`, `sparsity_report`; the `Sparsify` pass), `smoothquant` (`SmoothQuant`), `awq` (`AWQ`), `lowrank`
(`LowRank`), and `fold` (scale folding that SmoothQuant and AWQ share)."""
