#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_protocol::fuzzing::grant(data));
