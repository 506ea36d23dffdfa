//! Log set-up. Dependencies log their buffers at debug and trace level (sled prints whole write
//! batches, and those hold card keys), so their events are capped at info whatever `EDGECARD_LOG`
//! asks for. Edgecard's own events never carry keys or tokens.

use tracing::{Level, Metadata};
use tracing_subscriber::prelude::*;

/// Crates whose debug and trace events are never emitted.
const CAPPED: &[&str] =
    &["sled", "hyper", "hyper_util", "h2", "rustls", "tokio_rustls", "quinn", "quinn_proto", "rcgen"];

/// Whether an event passes the dependency cap.
pub fn allowed(metadata: &Metadata<'_>) -> bool {
    if *metadata.level() <= Level::INFO {
        return true;
    }
    let target = metadata.target();
    let crate_name = target.split("::").next().unwrap_or(target);
    !CAPPED.contains(&crate_name)
}

/// Logs to stderr, filtered by `EDGECARD_LOG` (default `info`), as JSON when
/// `EDGECARD_LOG_FORMAT=json`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGECARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("EDGECARD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let output = if json {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(allowed))
        .with(output)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::callsite::Identifier;
    use tracing::field::FieldSet;
    use tracing::metadata::Kind;

    struct Site;
    impl tracing::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("not registered")
        }
    }
    static SITE: Site = Site;

    fn meta(target: &'static str, level: Level) -> Metadata<'static> {
        Metadata::new("e", target, level, None, None, None, FieldSet::new(&[], Identifier(&SITE)), Kind::EVENT)
    }

    #[test]
    fn dependencies_are_capped_at_info() {
        assert!(!allowed(&meta("sled::tree", Level::TRACE)));
        assert!(!allowed(&meta("sled", Level::DEBUG)));
        assert!(!allowed(&meta("h2::codec", Level::TRACE)));
        assert!(allowed(&meta("sled::tree", Level::INFO)));
        assert!(allowed(&meta("sled", Level::WARN)));
        assert!(allowed(&meta("edgecard_node::orders::engine", Level::TRACE)));
        assert!(allowed(&meta("sledgehammer", Level::TRACE)), "only whole crate names are capped");
    }
}
