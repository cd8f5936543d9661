//! One safe entry to matrixmultiply's sgemm for the host's matrix products (the host expert
//! kernel's prompt batches, the predictor's hidden-layer training): operands as strided views
//! whose every reachable element is checked to lie inside its slice.

/// A strided view of a matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of a row-major `[rows, cols]` matrix.
    pub(crate) fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows: cols, cols: rows, row_stride: 1, col_stride: cols }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = a · b`, `c` row-major `[a.rows, b.cols]` (overwritten).
pub(crate) fn gemm(a: Mat, b: Mat, c: &mut [f32]) {
    assert!(a.cols == b.rows && a.fits() && b.fits() && c.len() >= a.rows * b.cols, "gemm operand shapes");
    // SAFETY: every element either operand's strides reach lies inside its slice (`fits`), C is
    // `a.rows x b.cols` row-major inside `c`, and `c` is borrowed mutably apart from both.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            0.0,
            c.as_mut_ptr(),
            b.cols as isize,
            1,
        );
    }
}
