"""qdata: learn from distributed data by quantizing the data, not the gradients."""
