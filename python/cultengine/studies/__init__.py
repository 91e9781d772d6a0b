"""Research studies reproduced at engine speed: `values`, `stories` (+ its analysis) and `ground`."""
