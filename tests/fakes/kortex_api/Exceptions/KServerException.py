"""Double of kortex_api.Exceptions.KServerException."""


class KServerException(Exception):
    def __init__(self, error_code, sub_code, message):
        super().__init__(f"Server error name={error_code}, sub name={sub_code} => {message}")
        self.error_code, self.sub_code = error_code, sub_code

    def get_error_code(self):
        return self.error_code

    def get_error_sub_code(self):
        return self.sub_code
