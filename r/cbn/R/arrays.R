# Checking and converting what users pass: arrays, axes (1-based as keras3),
# masks and per-channel vectors. Each helper stops with a message that names
# the argument, what was received and what is expected.

# A numeric array (or vector) as doubles: doubles are used as they are (the C
# glue reads them in place), integers and logicals are converted.
as_input_array <- function(x, name = "x") {
  if (is.data.frame(x)) {
    stop(sprintf("`%s` is a data frame; pass a numeric matrix or array (e.g. as.matrix(%s))",
                 name, name), call. = FALSE)
  }
  if (!(is.double(x) || is.integer(x) || is.logical(x)) || is.object(x) && !is.array(x)) {
    stop(sprintf("`%s` must be a numeric array, matrix or vector; received an object of class %s",
                 name, paste(class(x), collapse = "/")), call. = FALSE)
  }
  if (length(x) == 0L && is.null(dim(x))) {
    stop(sprintf("`%s` is empty", name), call. = FALSE)
  }
  if (!is.double(x)) storage.mode(x) <- "double"
  x
}

array_dims <- function(x) if (is.null(dim(x))) length(x) else dim(x)

# keras3's axis convention: 1-based, negative counts from the end (-1 = last),
# 0 is an error. Returns the 0-based non-negative axes the C glue takes.
resolve_axes <- function(axis, rank) {
  axis <- check_axis_arg(axis)
  bad <- axis[axis > rank | axis < -rank]
  if (length(bad)) {
    stop(sprintf("`axis` = %s is out of range for an input of rank %d (valid: 1..%d or -%d..-1)",
                 deparse1(bad), rank, rank, rank), call. = FALSE)
  }
  zero_based <- as.integer(ifelse(axis > 0, axis - 1L, rank + axis))
  if (anyDuplicated(zero_based)) {
    stop(sprintf("`axis` = %s names the same axis twice (input rank %d)", deparse1(axis), rank),
         call. = FALSE)
  }
  zero_based
}

# The form checks that need no input: whole numbers, no 0, no repeats.
check_axis_arg <- function(axis) {
  if (!is.numeric(axis) || length(axis) == 0L || anyNA(axis) || any(axis != trunc(axis))) {
    stop(sprintf("`axis` must be whole numbers (1-based, negative from the end); received %s",
                 deparse1(axis)), call. = FALSE)
  }
  if (any(axis == 0)) {
    stop("`axis` = 0 is not an axis: axes are 1-based (1 is the first, -1 the last)",
         call. = FALSE)
  }
  if (anyDuplicated(axis)) stop(sprintf("`axis` = %s repeats an axis", deparse1(axis)), call. = FALSE)
  as.integer(axis)
}

# A mask as the raw (uint8) array the core takes: the input's rank with every
# size equal to the input's or 1, or one dimension fewer (a trailing size-1
# axis is appended: a (batch, time) mask for a (batch, time, features) input).
as_mask <- function(mask, x_dims) {
  if (is.null(mask)) return(NULL)
  if (!(is.logical(mask) || is.numeric(mask))) {
    stop(sprintf("`mask` must be a logical or numeric array; received class %s",
                 paste(class(mask), collapse = "/")), call. = FALSE)
  }
  if (anyNA(mask)) stop("`mask` contains NA; use TRUE/FALSE (or non-zero/0)", call. = FALSE)
  dims <- array_dims(mask)
  if (length(dims) == length(x_dims) - 1L) dims <- c(dims, 1L)
  if (length(dims) != length(x_dims) || any(dims != x_dims & dims != 1L)) {
    stop(sprintf(paste0("`mask` of shape (%s) does not broadcast to the input's shape (%s): ",
                        "expected the input's shape (sizes may be 1) or it without the last axis"),
                 paste(array_dims(mask), collapse = ", "), paste(x_dims, collapse = ", ")),
         call. = FALSE)
  }
  array(as.raw(mask != 0), dim = dims)
}

# A per-channel vector of length `channels` (any dims with that many values).
as_channel_values <- function(values, channels, name, optional = FALSE) {
  if (is.null(values) && optional) return(NULL)
  if (!is.numeric(values) || length(values) != channels) {
    stop(sprintf("`%s` must be numeric with one value per channel (%d); received %s of length %d",
                 name, channels, class(values)[1], length(values)), call. = FALSE)
  }
  as.double(values)
}

check_flag <- function(value, name) {
  if (!is.logical(value) || length(value) != 1L || is.na(value)) {
    stop(sprintf("`%s` must be TRUE or FALSE; received %s", name, deparse1(value)), call. = FALSE)
  }
  value
}

check_number <- function(value, name, lower = -Inf, upper = Inf) {
  if (!is.numeric(value) || length(value) != 1L || is.na(value) || value < lower || value > upper) {
    stop(sprintf("`%s` must be one number in [%s, %s]; received %s",
                 name, lower, upper, deparse1(value)), call. = FALSE)
  }
  as.double(value)
}
