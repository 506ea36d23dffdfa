#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_node::fuzzing::stripe_webhook(data));
