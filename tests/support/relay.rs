//! (being written: the fault-injecting relay)
