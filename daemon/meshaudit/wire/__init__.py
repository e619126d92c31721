"""What meshaudit processes send each other over Kafka in the distributed mode (issue 15): the
hop batches receivers produce and evaluators consume (:mod:`meshaudit.wire.hops`)."""
