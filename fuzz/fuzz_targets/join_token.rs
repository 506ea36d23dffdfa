#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_coordinator::fuzzing::join_token(data));
