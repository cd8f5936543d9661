//! Lookup tables of Mixture-of-Lookup-Experts models: the on-disk format (`format`) and the
//! memory-mapped table with its row cache and statistics (`table`).

mod format;
mod table;

pub use format::{HEADER_BYTES, LUT_FILE, LutDtype, LutHeader, MAGIC, VERSION};
pub use table::{LookupStats, LookupTable};
