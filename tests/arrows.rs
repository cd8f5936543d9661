//! The layering of ARCHITECTURE.md, held by reading the sources: between crates app -> models,
//! runtime -> shaders; inside the runtime engine -> graph -> experts -> shaders, with options a
//! leaf. An import against an arrow fails here, naming the file and the line.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `path` (a folder or one file), relative to the workspace root.
fn sources(path: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if root.join(path).is_file() {
        return vec![root.join(path)];
    }
    let mut out = Vec::new();
    let mut todo = vec![root.join(path)];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "no sources under {path}");
    out
}

/// Lines of the files under `path` (outside `#[cfg(test)]` modules) that mention any of
/// `forbidden`, as `file:line: text`.
fn offending(path: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in sources(path) {
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        // Test modules come last in Ferry's files; their helpers may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let code_part = line.split("//").next().unwrap_or("");
            if forbidden.iter().any(|f| code_part.contains(f)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn imports_follow_the_arrows_of_the_architecture() {
    let upward = ["crate::experts", "crate::graph", "crate::engine"];
    let rules: [(&str, &[&str]); 11] = [
        // Kernels know tensors and plain parameters, nothing of Ferry.
        ("shaders/src", &["ferry_runtime", "ferry_models"]),
        // The runtime knows no family and no command.
        ("runtime/src", &["ferry_models"]),
        ("models/src", &["ferry::"]),
        // The expert manager never calls back into the graph or the engine.
        ("runtime/src/experts", &["crate::graph", "crate::engine", "crate::measure"]),
        ("runtime/src/graph", &["crate::engine"]),
        ("runtime/src/measure", &["crate::graph", "crate::engine"]),
        // Leaves: the checkpoint, the lookup tables, the model description and the routing rule
        // read options at most; options imports nothing of Ferry.
        ("runtime/src/weights", &upward),
        ("runtime/src/lut", &upward),
        ("runtime/src/spec.rs", &upward),
        ("runtime/src/routing.rs", &upward),
        ("runtime/src/options.rs", &["crate::", "super::"]),
    ];
    let found: Vec<String> = rules.iter().flat_map(|(path, forbidden)| offending(path, forbidden)).collect();
    assert!(found.is_empty(), "imports against the arrows:\n{}", found.join("\n"));
}
