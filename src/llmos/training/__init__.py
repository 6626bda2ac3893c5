"""Programs the OS runs: dataset formats today; fine-tuning and pre-training build on them."""
