#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgecard_protocol::fuzzing::sync_upload(data));
