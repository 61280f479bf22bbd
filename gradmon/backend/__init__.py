"""What differs between frameworks and Keras versions: distribution, host reads,
private Keras internals gradmon relies on (`keras_compat`)."""
