"""Research tools: the speed benchmark (Table 3), ablations (Table 5), attention biases, timing."""
