"""Ray drivers: orchestration only. Decoding, encoding, training and formats live in `motiondirector`."""
