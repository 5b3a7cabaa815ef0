//! Prometheus metrics read the way Prometheus reads them: the text format parsed by a real
//! parser (`prometheus-parse`), never by matching strings, and samples looked up by name and
//! labels.

pub use prometheus_parse::{Scrape, Value};

/// Parses a `/metrics` answer or a node_exporter textfile; panics when it does not parse.
pub fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the metrics parse")
}

/// The value of the first sample `name` that has these labels among its own.
pub fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a number"),
        })
}
