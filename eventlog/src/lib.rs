//! The durable event log: the source of truth of taskledger.
