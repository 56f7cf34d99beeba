//! The worked examples of `docs/policy.md`, for the tests of every crate
//! that checks them: each is the YAML block that follows a line
//! `<!-- example: NAME -->`. Keeping them in the document (rather than
//! copies in tests) means the documentation cannot drift from what is tested.

use std::collections::BTreeMap;

/// Where the document is, from any crate of the workspace.
pub const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy.md");

/// `name → YAML text` of every example in `markdown`.
pub fn parse(markdown: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- example:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        // The next fenced block.
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
        }
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.insert(name.trim().to_string(), body);
    }
    out
}

/// The examples of `docs/policy.md`. Panics (in tests) naming the file
/// when it cannot be read.
pub fn load() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("reading {DOC}: {e}"));
    parse(&text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_named_blocks() {
        let md = "text\n<!-- example: one -->\n```yaml\na: 1\n```\n\n<!-- example: two -->\n\n```yaml\nb: 2\nc: 3\n```\n";
        let ex = super::parse(md);
        assert_eq!(ex["one"], "a: 1\n");
        assert_eq!(ex["two"], "b: 2\nc: 3\n");
        assert_eq!(ex.len(), 2);
    }

    #[test]
    fn the_document_has_its_examples() {
        let ex = super::load();
        for name in [
            "cluster",
            "namespace-default",
            "server-one-sa",
            "mesh-tls-wildcard",
            "network-except",
            "malformed",
        ] {
            assert!(ex.contains_key(name), "docs/policy.md lacks example {name}");
        }
    }
}
