/** GGUF metadata value type ids (gguf.md `gguf_metadata_value_type`), shared by the reader and the writer. */
export const T_UINT8 = 0
export const T_INT8 = 1
export const T_UINT16 = 2
export const T_INT16 = 3
export const T_UINT32 = 4
export const T_INT32 = 5
export const T_FLOAT32 = 6
export const T_BOOL = 7
export const T_STRING = 8
export const T_ARRAY = 9
export const T_UINT64 = 10
export const T_INT64 = 11
export const T_FLOAT64 = 12
