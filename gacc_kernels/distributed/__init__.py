"""Reduce, the stage between the last micro-step's launches and finalize: nothing on one process
(`reducer.LocalReducer`), the ranks' fp32 sums under data parallel (`allreduce.AllReduce`), FSDP2's
sharded grads (`fsdp2.ShardedReducer`), and the DDP wrapper's own machinery (`ddp`)."""
